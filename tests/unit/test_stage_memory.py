"""What a stage keeps while its LLM call is pending.

A call takes seconds and thousands of jobs may wait on one at once in one process, so
what each keeps through the wait is multiplied by thousands: the draft stage keeps the
prompt, not the outline as a model nor the sources and facts the prompt was built from;
the SEO stage keeps the cited Markdown, its headings and paragraphs, and the prompt, not
the document's per-line view (a tuple for each line) nor the prompt's plain text.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable

import pytest

from core.constants import STAGES
from core.llm import LLMRequest, LLMResponse, TextCallback
from core.llm.offline import OfflineLLM
from core.requests import BlogRequest
from core.settings import Settings
from stages.base import StageInput
from stages.markdown_doc import MarkdownDoc
from stages.models import Outline, OutlineSection
from stages.registry import get_stage


class Watching(OfflineLLM):
    """The offline LLM, counting the objects ``kept`` matches when each call starts."""

    def __init__(self, kept: Callable[[object], bool]) -> None:
        super().__init__()
        self.kept = kept
        self.alive: list[int] = []

    async def generate(
        self, request: LLMRequest, on_text: TextCallback | None = None
    ) -> LLMResponse:
        gc.collect()
        self.alive.append(sum(self.kept(o) for o in gc.get_objects()))
        return await super().generate(request, on_text)


def _outline_model(o: object) -> bool:
    return isinstance(o, Outline | OutlineSection)


def _document_with_lines(o: object) -> bool:
    return isinstance(o, MarkdownDoc) and "lines" in vars(o)


@pytest.mark.parametrize(
    ("stage", "kept"), [("draft", _outline_model), ("seo", _document_with_lines)]
)
async def test_a_stage_keeps_only_what_it_needs_through_its_llm_call(
    stage: str, kept: Callable[[object], bool]
) -> None:
    request = BlogRequest(topic="Indoor plants for dark rooms", keywords=["indoor plants"])
    settings = Settings()
    outputs: dict[str, dict[str, object]] = {}
    for name in STAGES[: STAGES.index(stage)]:
        stage_input = StageInput(request=request, outputs=dict(outputs), settings=settings)
        result = await asyncio.wait_for(get_stage(name).run(stage_input, OfflineLLM()), 30)
        outputs[name] = result.output
    llm = Watching(kept)
    stage_input = StageInput(request=request, outputs=outputs, settings=settings)
    result = await asyncio.wait_for(get_stage(stage).run(stage_input, llm), 30)
    assert llm.alive == [0]
    text = result.output["markdown" if stage == "draft" else "content"]
    assert text.startswith("# ")
    assert "## " in text
