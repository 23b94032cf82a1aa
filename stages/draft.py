"""Stage 3: draft — the article in Markdown, streamed so progress moves while it is written."""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

from core.errors import RetryableError, StageError
from core.llm import LLM, LLMRequest, LLMResponse
from stages.base import ProgressReporter, StageInput, StageResult
from stages.markdown_doc import word_count
from stages.models import Outline
from stages.outline import planned_words
from stages.placeholder import placeholder_draft
from stages.prompts import (
    DRAFT_LENGTH_SYSTEM,
    DRAFT_SYSTEM,
    content_requirements,
    user_message,
)
from stages.stage_output import earlier_output, stage_result, stored_model

CHARS_PER_WORD = 6.2
"""Average Markdown characters per counted word, to turn streamed text into a fraction."""
REPORT_STEPS = (0.25, 0.5, 0.75)
"""Fractions of the stage at which streamed progress is reported (a few, not per chunk)."""
LENGTH_TOLERANCE = 0.15
"""How far outside the length band a draft may be before it gets a corrective pass."""
_WRAPPING_FENCE = re.compile(r"^\s*```(?:markdown|md)?\s*\n(.*)\n```\s*$", re.DOTALL)


class StreamProgress:
    """Turns streamed text into a handful of progress reports."""

    def __init__(self, report: ProgressReporter, expected_words: int) -> None:
        self.report = report
        self.expected_chars = max(1.0, expected_words * CHARS_PER_WORD)
        self.received = 0
        self.steps = list(REPORT_STEPS)

    async def __call__(self, chunk: str) -> None:
        self.received += len(chunk)
        fraction = min(0.95, self.received / self.expected_chars)
        if self.steps and fraction >= self.steps[0]:
            while self.steps and fraction >= self.steps[0]:
                self.steps.pop(0)
            words = int(self.received / CHARS_PER_WORD)
            await self.report(fraction, f"Writing the draft: about {words} words so far")


def clean_markdown(text: str) -> str:
    """The article without a code fence wrapped around all of it."""
    match = _WRAPPING_FENCE.match(text)
    return (match.group(1) if match else text).strip() + "\n"


def _numbered_sources(research: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {
            "number": index,
            "id": s.get("id"),
            "title": s.get("title"),
            "url": s.get("url"),
            "snippets": s.get("snippets") or [],
        }
        for index, s in enumerate(research.get("sources", []), start=1)
    ]


def _facts(research: dict[str, Any], numbers: dict[str, int]) -> list[dict[str, Any]]:
    """Research facts with their sources as citation numbers."""
    return [
        {
            "claim": fact.get("claim"),
            "cite": [numbers[i] for i in fact.get("source_ids") or [] if i in numbers],
        }
        for fact in research.get("facts") or []
    ]


def _outline_context(outline: Outline, numbers: dict[str, int]) -> dict[str, Any]:
    """The outline as the writer sees it: section source ids become ``cite`` numbers."""
    plan = outline.model_dump(mode="json")
    for section in plan["sections"]:
        section["cite"] = [numbers[i] for i in section.pop("source_ids") if i in numbers]
    return plan


def length_off_band(words: int, band: tuple[int, int]) -> bool:
    """Whether ``words`` misses the band by more than the tolerance (15%)."""
    low, high = band
    return words < low * (1 - LENGTH_TOLERANCE) or words > high * (1 + LENGTH_TOLERANCE)


def _distance(words: int, band: tuple[int, int]) -> int:
    low, high = band
    return max(low - words, words - high, 0)


class DraftStage:
    """Writes the article from the outline, citing research sources by number."""

    name = "draft"

    async def run(self, stage_input: StageInput, llm: LLM) -> StageResult:
        """Produce the Markdown draft; one corrective pass if its length is far off."""
        request = stage_input.request
        source_count, expected, user = self._prompt(stage_input)
        progress = StreamProgress(stage_input.report, expected)
        response = await llm.generate(
            LLMRequest(
                stage=self.name,
                system=DRAFT_SYSTEM,
                user=user,
                output_type=None,
                offline=lambda: placeholder_draft(request, _outline(stage_input), source_count),
                stream=True,
                max_tokens=max(2000, int(expected * 2.2)),
                temperature=0.7,
            ),
            on_text=progress,
        )
        markdown = _markdown(response)
        warnings: list[str] = []
        if request.use_consensus_generation:
            warnings.append("use_consensus_generation is not supported yet: one draft was written")
        band = request.word_band
        words = word_count(markdown)
        if length_off_band(words, band):
            await stage_input.report(0.95, f"Adjusting the length: {words} words written")
            try:
                fixed, response = await self._correct_length(
                    stage_input, llm, markdown, words, expected, response
                )
            except StageError as exc:
                # The first draft is still an article; a failed rewrite should not lose it.
                fixed = markdown
                warnings.append(f"The corrective length pass failed: {exc}")
            fixed_words = word_count(fixed)
            if _distance(fixed_words, band) < _distance(words, band):
                markdown, words = fixed, fixed_words
            if length_off_band(words, band):
                warnings.append(
                    f"The draft has {words} words, more than {LENGTH_TOLERANCE:.0%} outside the "
                    f"requested {band[0]}-{band[1]} even after a corrective pass"
                )
        output = {"markdown": markdown, "word_count": words}
        return stage_result(response, output, warnings)

    def _prompt(self, stage_input: StageInput) -> tuple[int, int, str]:
        """The number of sources to cite, the words planned, and the prompt.

        Built apart from the LLM call so that what the prompt was built from (the outline
        as a model, the numbered sources, facts and outline context: about 12 KB a job) is
        not kept through the call, which takes seconds while thousands of jobs may be
        waiting on one."""
        request = stage_input.request
        research = earlier_output(stage_input, "research")
        outline = _outline(stage_input)
        sources = _numbered_sources(research) if request.use_citations else []
        numbers = {str(s["id"]): s["number"] for s in sources if s["id"]}
        expected = planned_words(outline, request)
        context: dict[str, Any] = {
            "outline": _outline_context(outline, numbers),
            "citations_enabled": bool(sources),
            "sources": sources,
            "facts": _facts(research, numbers),
            "semantic_keywords": research.get("semantic_keywords", []),
            "entities": research.get("entities", []),
            "requirements": content_requirements(request),
            "total_words": expected,
        }
        return len(sources), expected, user_message(request, context)

    async def _correct_length(
        self,
        stage_input: StageInput,
        llm: LLM,
        markdown: str,
        words: int,
        expected: int,
        first: LLMResponse,
    ) -> tuple[str, LLMResponse]:
        """One rewrite towards ``expected`` words; the response carries the usage of both."""
        request = stage_input.request
        context = {
            "article": markdown,
            "word_count": words,
            "word_range": list(request.word_band),
            "target_words": expected,
        }
        second = await llm.generate(
            LLMRequest(
                stage=self.name,
                system=DRAFT_LENGTH_SYSTEM,
                user=user_message(request, context),
                output_type=None,
                offline=lambda: markdown,
                max_tokens=max(2000, int(expected * 2.2)),
                temperature=0.4,
            )
        )
        combined = replace(second, usage=first.usage + second.usage)
        return _markdown(second), combined


def _outline(stage_input: StageInput) -> Outline:
    """The outline stage's output as a model."""
    stored = earlier_output(stage_input, "outline")
    # Outlines stored before sections named their sources have no source_ids.
    stored["sections"] = [{"source_ids": [], **section} for section in stored.get("sections") or []]
    return stored_model(stored, Outline)


def _markdown(response: LLMResponse) -> str:
    if not isinstance(response.output, str) or not response.output.strip():
        raise RetryableError("the draft came back empty")
    return clean_markdown(response.output)
