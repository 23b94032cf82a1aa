"""The four stages through the real SDK against the fake OpenAI server, in every mode."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from core.constants import STAGES
from core.errors import PermanentError, RetryableError
from core.llm.offline import OFFLINE_WARNING
from core.llm.openai_client import STRUCTURED_MODES, OpenAILLM
from core.requests import BlogRequest, Length
from core.settings import Settings
from stages.base import StageInput
from stages.inline import run_inline
from stages.quality import check_citations
from stages.registry import get_stage
from tests.support.fake_openai import FakeOpenAI, running_fake_openai

TIMEOUT = 30.0


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    """A running fake OpenAI server for this test."""
    async with running_fake_openai() as server:
        yield server


REQUEST = BlogRequest(topic="Sample keyword planning", keywords=["sample keyword", "planning"])


def _settings(fake: FakeOpenAI) -> Settings:
    return Settings(llm="openai", openai_api_key="sk-test", openai_base_url=fake.base_url)


@pytest.fixture(params=STRUCTURED_MODES)
async def llm(request: pytest.FixtureRequest, fake: FakeOpenAI) -> AsyncIterator[OpenAILLM]:
    client = OpenAILLM(_settings(fake), structured_mode=request.param, timeout=5.0)
    yield client
    await asyncio.wait_for(client.close(), TIMEOUT)


async def test_all_stages_produce_a_contract_result(llm: OpenAILLM, fake: FakeOpenAI) -> None:
    result = await asyncio.wait_for(run_inline(REQUEST, llm, _settings(fake)), TIMEOUT)

    assert dict(fake.calls) == {stage: 1 for stage in STAGES}
    assert [e["stage"] for e in result["stage_results"]] == list(STAGES)
    assert all(e["provider"] == "openai" and e["tokens"] > 0 for e in result["stage_results"])
    assert result["total_tokens"] == sum(u["total_tokens"] for u in fake.usages)
    assert result["total_cost"] > 0
    assert OFFLINE_WARNING not in result["warnings"]
    # The fake's generic answers get repaired in code: snippet lengths, keyword, H1.
    assert len(result["meta_title"]) <= 60 and "sample keyword" in result["meta_title"].lower()
    assert 120 <= len(result["meta_description"]) <= 160
    assert result["title"] == "Sample Title"
    assert result["structured_data"]["@type"] == "BlogPosting"
    assert [c["url"] for c in result["citations"]] == [
        f"https://example.org/reference-{n}" for n in (1, 2, 3)
    ]
    assert check_citations(result["content"]) == []
    ids = [h["id"] for h in result["content_metadata"]["headings"]]
    assert len(ids) == len(set(ids))


async def test_a_stage_recovers_from_invalid_output(llm: OpenAILLM, fake: FakeOpenAI) -> None:
    fake.fail("invalid_json", stage="outline")
    result = await asyncio.wait_for(run_inline(REQUEST, llm, _settings(fake)), TIMEOUT)
    assert fake.calls["outline"] == 2
    outline_tokens = next(e["tokens"] for e in result["stage_results"] if e["stage"] == "outline")
    outline_usages = [
        u
        for u, body in zip(fake.usages, fake.requests, strict=True)
        if "blogpipe stage: outline" in body["messages"][0]["content"]
    ]
    assert outline_tokens == sum(u["total_tokens"] for u in outline_usages)


async def test_draft_streams_progress(llm: OpenAILLM, fake: FakeOpenAI) -> None:
    outputs: dict[str, dict[str, Any]] = {}
    for name in ("research", "outline"):
        done = await asyncio.wait_for(
            get_stage(name).run(StageInput(REQUEST, outputs, _settings(fake)), llm), TIMEOUT
        )
        outputs[name] = done.output
    reports: list[float] = []

    async def report(fraction: float, details: str) -> None:
        reports.append(fraction)

    draft = await asyncio.wait_for(
        get_stage("draft").run(StageInput(REQUEST, outputs, _settings(fake), report=report), llm),
        TIMEOUT,
    )
    assert draft.provider == "openai" and draft.output["word_count"] > 300
    assert fake.requests[-1]["stream"] is True
    assert 1 <= len(reports) <= 4 and reports == sorted(reports)


async def test_stage_faults_surface_as_domain_errors(llm: OpenAILLM, fake: FakeOpenAI) -> None:
    fake.fail("refusal", stage="research")
    with pytest.raises(PermanentError):
        await asyncio.wait_for(run_inline(REQUEST, llm, _settings(fake)), TIMEOUT)
    fake.fail("length", stage="research")
    with pytest.raises(RetryableError):
        await asyncio.wait_for(run_inline(REQUEST, llm, _settings(fake)), TIMEOUT)


MID_BAND = {"short": 450, "medium": 900, "long": 1800, "extended": 3000}
FAR_BELOW = {"short": 150, "medium": 300, "long": 700, "extended": 1500}


async def _generate_with(fake: FakeOpenAI, request: BlogRequest) -> dict[str, Any]:
    llm = OpenAILLM(_settings(fake), timeout=5.0)
    try:
        return await asyncio.wait_for(run_inline(request, llm, _settings(fake)), TIMEOUT)
    finally:
        await asyncio.wait_for(llm.close(), TIMEOUT)


def _length_warnings(result: dict[str, Any]) -> list[str]:
    return [w for w in result["warnings"] if "corrective pass" in w]


@pytest.mark.parametrize("length", list(Length))
async def test_an_in_band_draft_passes_without_correction(fake: FakeOpenAI, length: Length) -> None:
    fake.article_words = MID_BAND[length.value]
    result = await _generate_with(fake, REQUEST.model_copy(update={"length": length}))

    low, high = REQUEST.model_copy(update={"length": length}).word_band
    assert low <= result["content_metadata"]["word_count"] <= high
    assert fake.calls["draft"] == 1
    assert _length_warnings(result) == []
    assert result["quality_dimensions"]["length"] == 100.0
    assert not [w for w in result["warnings"] if "words, below" in w or "words, above" in w]


@pytest.mark.parametrize("length", list(Length))
async def test_a_far_off_draft_gets_one_corrective_pass_then_a_warning(
    fake: FakeOpenAI, length: Length
) -> None:
    fake.article_words = FAR_BELOW[length.value]
    result = await _generate_with(fake, REQUEST.model_copy(update={"length": length}))

    assert fake.calls["draft"] == 2
    corrective = fake.requests[-2]  # the seo call comes last
    assert "adjusting the length" in corrective["messages"][0]["content"]
    assert "stream" not in corrective or not corrective["stream"]
    assert result["success"] is True
    [warning] = _length_warnings(result)
    assert "outside the requested" in warning
    draft_tokens = next(e["tokens"] for e in result["stage_results"] if e["stage"] == "draft")
    draft_usages = [
        u
        for u, body in zip(fake.usages, fake.requests, strict=True)
        if "blogpipe stage: draft" in body["messages"][0]["content"]
    ]
    assert len(draft_usages) == 2
    assert draft_tokens == sum(u["total_tokens"] for u in draft_usages)


async def test_a_corrective_pass_that_lands_in_band_leaves_no_warning(fake: FakeOpenAI) -> None:
    fake.article_lengths = [2400, 900]  # far above medium (600-1200), then in band
    result = await _generate_with(fake, REQUEST)

    assert fake.calls["draft"] == 2
    assert 600 <= result["content_metadata"]["word_count"] <= 1200
    assert _length_warnings(result) == []


async def test_a_draft_slightly_off_band_is_not_rewritten(fake: FakeOpenAI) -> None:
    fake.article_words = 1280  # above 1200 but within 15%
    result = await _generate_with(fake, REQUEST)
    assert fake.calls["draft"] == 1
    assert any("words, above the requested 600-1200" in w for w in result["warnings"])
