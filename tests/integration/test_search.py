"""The Google Programmable Search client and the research stage against a fake search API.

The research stage runs through the real ``openai`` SDK against the fake OpenAI server,
so the citations of the finished article are checked against what search returned.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import pytest

from core.errors import PermanentError, RetryableError
from core.llm.openai_client import OpenAILLM
from core.requests import BlogRequest, ResearchDepth
from core.search import GoogleSearch, search_configured
from core.settings import Settings
from stages.base import StageInput
from stages.inline import run_inline
from stages.markdown_doc import CITATION
from stages.models import Fact, Perspective, ResearchNotes
from stages.quality import check_citations
from stages.registry import get_stage
from stages.research import NO_SEARCH_WARNING
from stages.sources import domain_of, normalise_url
from tests.support.fake_openai import FakeOpenAI, running_fake_openai
from tests.support.fake_search import FakeSearch, item, running_fake_search

T = TypeVar("T")
TIMEOUT = 20.0
REQUEST = BlogRequest(
    topic="Sample keyword planning for small teams",
    keywords=["sample keyword", "planning"],
    research_depth=ResearchDepth.standard,
)
RESULTS = [
    item("https://www.alpha.example/guide/?utm_source=x", "Alpha guide", "Alpha says plan early."),
    item("https://pinterest.com/pin/123", "Pinned idea", "A blocked result."),
    item("https://beta.example/research", "Beta research", "Beta measured 40% gains."),
    item("http://alpha.example/guide#top", "Alpha guide again", "Alpha lists five steps."),
    item("https://gamma.example/faq", "Gamma FAQ", "Gamma answers common questions."),
    item("https://alpha.example/other", "Alpha other", "Another Alpha page."),
    item("https://alpha.example/third", "Alpha third", "A third Alpha page."),
    item("https://delta.example/case", "Delta case study", "Delta reports a case study."),
]


async def within(awaitable: Awaitable[T], deadline: float = TIMEOUT) -> T:
    return await asyncio.wait_for(awaitable, deadline)


@pytest.fixture
async def search() -> AsyncIterator[FakeSearch]:
    async with running_fake_search() as fake:
        fake.results = list(RESULTS)
        yield fake


@pytest.fixture
async def openai_fake() -> AsyncIterator[FakeOpenAI]:
    async with running_fake_openai() as fake:
        yield fake


def _settings(search: FakeSearch, openai_fake: FakeOpenAI | None = None) -> Settings:
    settings = Settings(
        google_search_api_key="test-key",
        google_search_engine_id="test-cx",
        google_search_base_url=search.base_url,
        search_blocked_domains=("pinterest.com",),
    )
    if openai_fake is not None:
        settings = settings.with_changes(
            llm="openai", openai_api_key="sk-test", openai_base_url=openai_fake.base_url
        )
    return settings


def _grounded_notes() -> dict[str, Any]:
    return ResearchNotes(
        summary="Planning keywords pays off.",
        search_intent="informational",
        perspectives=[Perspective(perspective="A marketer", questions=["Where to start?"])],
        key_points=["Plan early", "Measure gains"],
        audience_insights=["Small teams lack time."],
        questions=["How do I start?", "What does it cost?"],
        semantic_keywords=["keyword research"],
        facts=[
            Fact(claim="Planning early helps.", source_ids=["S1"]),
            Fact(claim="Gains of 40% were measured.", source_ids=["S2", "S99"]),
            Fact(claim="An invented claim.", source_ids=["S42"]),
        ],
        entities=["Alpha", "Beta"],
        competitor_headings=["What is keyword planning?"],
    ).model_dump(mode="json")


async def test_client_sends_credentials_and_parses_items(search: FakeSearch) -> None:
    async with GoogleSearch.from_settings(_settings(search)) as client:
        hits = await within(client.search("keyword planning", count=3))
    assert [hit.url for hit in hits] == [r["link"] for r in RESULTS[:3]]
    assert hits[0].title == "Alpha guide" and hits[0].snippet == "Alpha says plan early."
    assert search.params[0]["key"] == "test-key" and search.params[0]["cx"] == "test-cx"
    assert search.params[0]["num"] == "3"


async def test_no_results_is_an_empty_list(search: FakeSearch) -> None:
    search.results = []
    async with GoogleSearch.from_settings(_settings(search)) as client:
        assert await within(client.search("nothing")) == []


@pytest.mark.parametrize("status", [429, 500, 503])
async def test_rate_limits_and_server_errors_are_retryable(search: FakeSearch, status: int) -> None:
    search.fail(status)
    async with GoogleSearch.from_settings(_settings(search)) as client:
        with pytest.raises(RetryableError, match=f"HTTP {status}"):
            await within(client.search("keyword planning"))


async def test_timeout_is_retryable(search: FakeSearch) -> None:
    search.fail("slow", delay=5)
    client = GoogleSearch("k", "cx", base_url=search.base_url, timeout=0.2)
    async with client:
        with pytest.raises(RetryableError, match="timed out"):
            await within(client.search("keyword planning"))


@pytest.mark.parametrize("status", [400, 401, 403])
async def test_configuration_errors_are_permanent_and_say_so(
    search: FakeSearch, status: int
) -> None:
    search.fail(status, reason="accessNotConfigured")
    async with GoogleSearch.from_settings(_settings(search)) as client:
        with pytest.raises(PermanentError, match="GOOGLE_SEARCH_API_KEY") as caught:
            await within(client.search("keyword planning"))
    assert f"HTTP {status}" in str(caught.value) and "accessNotConfigured" in str(caught.value)


def test_search_needs_both_credentials() -> None:
    assert not search_configured(Settings(google_search_api_key="k"))
    assert search_configured(Settings(google_search_api_key="k", google_search_engine_id="c"))
    with pytest.raises(PermanentError, match="GOOGLE_SEARCH_ENGINE_ID"):
        GoogleSearch.from_settings(Settings(google_search_api_key="k"))


async def test_research_sources_are_unique_allowed_and_from_several_domains(
    search: FakeSearch, openai_fake: FakeOpenAI
) -> None:
    openai_fake.canned["research"] = _grounded_notes()
    settings = _settings(search, openai_fake)
    llm = OpenAILLM(settings, timeout=5.0)
    try:
        research = await within(get_stage("research").run(StageInput(REQUEST, {}, settings), llm))
    finally:
        await within(llm.close())
    output = research.output

    assert 2 <= len(search.queries) <= 4
    assert len(set(search.queries)) == len(search.queries)
    assert all(":" not in query for query in search.queries)
    assert output["queries"] == search.queries and output["search_provider"] == "google_cse"
    sources = output["sources"]
    keys = [normalise_url(s["url"]) for s in sources]
    assert len(keys) == len(set(keys))
    assert not any("pinterest" in s["url"] for s in sources)
    domains = [domain_of(s["url"]) for s in sources]
    # Every distinct domain is kept before any domain gets a second page; at most two each.
    assert set(domains) == {"alpha.example", "beta.example", "gamma.example", "delta.example"}
    assert domains.count("alpha.example") == 2 and len(sources) == 5
    assert "https://alpha.example/third" not in [s["url"] for s in sources]
    assert [s["id"] for s in sources] == [f"S{n}" for n in range(1, 6)]
    assert all(s["provider"] == "google_cse" and s["retrieved_at"] for s in sources)
    # The duplicate's snippet is kept with the first occurrence.
    assert sources[0]["snippets"] == ["Alpha says plan early.", "Alpha lists five steps."]
    assert output["facts"] == [
        {"claim": "Planning early helps.", "source_ids": ["S1"]},
        {"claim": "Gains of 40% were measured.", "source_ids": ["S2"]},
    ]
    assert NO_SEARCH_WARNING not in output["warnings"]
    assert any("block-listed" in w for w in output["warnings"])
    assert any("Dropped 1 research facts" in w for w in output["warnings"])
    # The LLM saw the sources with their ids; the search API saw no operators.
    user = openai_fake.requests[0]["messages"][1]["content"]
    assert '"id": "S1"' in user and "beta.example/research" in user


async def test_article_citations_resolve_to_searched_sources(
    search: FakeSearch, openai_fake: FakeOpenAI
) -> None:
    openai_fake.canned["research"] = _grounded_notes()
    settings = _settings(search, openai_fake)
    llm = OpenAILLM(settings, timeout=5.0)
    try:
        result = await within(run_inline(REQUEST, llm, settings))
    finally:
        await within(llm.close())

    searched = {normalise_url(r["link"]): r["link"] for r in RESULTS}
    assert result["citations"]
    for citation in result["citations"]:
        assert normalise_url(citation["url"]) in searched
        assert "pinterest" not in citation["url"]
    assert check_citations(result["content"]) == []
    body = result["content"].split("## References")[0]
    assert {int(n) for m in CITATION.finditer(body) for n in m.group(1).split(",")} == {1, 2, 3}
    assert NO_SEARCH_WARNING not in result["warnings"]


async def test_without_credentials_research_warns_sources_are_unverified(
    openai_fake: FakeOpenAI,
) -> None:
    settings = Settings(
        llm="openai", openai_api_key="sk-test", openai_base_url=openai_fake.base_url
    )
    llm = OpenAILLM(settings, timeout=5.0)
    try:
        research = await within(get_stage("research").run(StageInput(REQUEST, {}, settings), llm))
    finally:
        await within(llm.close())
    assert research.output["warnings"][0] == NO_SEARCH_WARNING
    assert research.output["queries"] == [] and research.output["search_provider"] is None
    assert all(s["provider"] == "llm" for s in research.output["sources"])


async def test_search_outage_fails_the_stage_retryably(
    search: FakeSearch, openai_fake: FakeOpenAI
) -> None:
    search.fail(503, times=10)
    settings = _settings(search, openai_fake)
    llm = OpenAILLM(settings, timeout=5.0)
    try:
        with pytest.raises(RetryableError):
            await within(get_stage("research").run(StageInput(REQUEST, {}, settings), llm))
    finally:
        await within(llm.close())
    assert openai_fake.calls["research"] == 0
