"""Stage 3: draft — the article in Markdown, streamed so progress moves while it is written."""

from __future__ import annotations

import re
from typing import Any

from core.errors import RetryableError
from core.llm import LLM, LLMRequest
from stages.base import ProgressReporter, StageInput, StageResult
from stages.markdown_doc import word_count
from stages.models import Outline
from stages.outline import planned_words
from stages.placeholder import placeholder_draft
from stages.prompts import DRAFT_SYSTEM, user_message
from stages.stage_output import earlier_output, stage_result, stored_model

CHARS_PER_WORD = 6.2
"""Average Markdown characters per counted word, to turn streamed text into a fraction."""
REPORT_STEPS = (0.25, 0.5, 0.75)
"""Fractions of the stage at which streamed progress is reported (a few, not per chunk)."""
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
        {"number": index, "title": s.get("title"), "url": s.get("url"), "snippet": s.get("snippet")}
        for index, s in enumerate(research.get("sources", []), start=1)
    ]


class DraftStage:
    """Writes the article from the outline, citing research sources by number."""

    name = "draft"

    async def run(self, stage_input: StageInput, llm: LLM) -> StageResult:
        """Produce the Markdown draft."""
        request = stage_input.request
        research = earlier_output(stage_input, "research")
        outline = stored_model(earlier_output(stage_input, "outline"), Outline)
        sources = _numbered_sources(research) if request.use_citations else []
        expected = planned_words(outline, request)
        context: dict[str, Any] = {
            "outline": outline.model_dump(mode="json"),
            "citations_enabled": bool(sources),
            "sources": sources,
            "semantic_keywords": research.get("semantic_keywords", []),
            "total_words": expected,
        }
        progress = StreamProgress(stage_input.report, expected)
        response = await llm.generate(
            LLMRequest(
                stage=self.name,
                system=DRAFT_SYSTEM,
                user=user_message(request, context),
                output_type=None,
                offline=lambda: placeholder_draft(request, outline, len(sources)),
                stream=True,
                max_tokens=max(2000, int(expected * 2.2)),
                temperature=0.7,
            ),
            on_text=progress,
        )
        if not isinstance(response.output, str) or not response.output.strip():
            raise RetryableError("the draft came back empty")
        markdown = clean_markdown(response.output)
        output = {"markdown": markdown, "word_count": word_count(markdown)}
        return stage_result(response, output)
