"""OpenAILLM through the real SDK against the fake OpenAI-compatible server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import openai
import pytest

from core.errors import ConfigError, PermanentError, RetryableError
from core.llm import LLMRequest, LLMResponse, Usage
from core.llm.factory import build_llm
from core.llm.openai_client import (
    STRUCTURED_MODES,
    InvalidOutputError,
    OpenAILLM,
    RefusedError,
    TruncatedOutputError,
    price_for,
    usage_from,
)
from core.settings import Settings
from stages.models import Outline, ResearchBrief
from stages.prompts import RESEARCH_SYSTEM
from tests.support.fake_openai import FakeOpenAI, running_fake_openai

T = TypeVar("T")
TIMEOUT = 15.0


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    """A running fake OpenAI server for this test."""
    async with running_fake_openai() as server:
        yield server


async def within(awaitable: Awaitable[T], deadline: float = TIMEOUT) -> T:
    """Every await of a test has a deadline."""
    return await asyncio.wait_for(awaitable, deadline)


def _settings(fake: FakeOpenAI, model: str = "gpt-4o-mini") -> Settings:
    return Settings(
        llm="openai", openai_api_key="sk-test", openai_base_url=fake.base_url, openai_model=model
    )


@pytest.fixture
async def make_llm(fake: FakeOpenAI) -> AsyncIterator[Any]:
    made: list[OpenAILLM] = []

    def make(**options: Any) -> OpenAILLM:
        options.setdefault("timeout", 5.0)
        llm = OpenAILLM(_settings(fake), **options)
        made.append(llm)
        return llm

    yield make
    for llm in made:
        await within(llm.close())


def _research() -> LLMRequest:
    return LLMRequest(
        stage="research",
        system=RESEARCH_SYSTEM,
        user="<blog_request>{}</blog_request>",
        output_type=ResearchBrief,
    )


def _draft() -> LLMRequest:
    return LLMRequest(
        stage="draft", system="blogpipe stage: draft\nWrite.", user="data", stream=True
    )


def _sum(usages: list[dict[str, Any]], key: str) -> int:
    return sum(int(u[key]) for u in usages)


@pytest.mark.parametrize("mode", STRUCTURED_MODES)
async def test_structured_output_in_each_mode(make_llm: Any, fake: FakeOpenAI, mode: str) -> None:
    response = await within(make_llm(structured_mode=mode).generate(_research()))

    assert isinstance(response.output, ResearchBrief)
    assert response.provider == "openai" and response.model == "gpt-4o-mini"
    assert response.usage.prompt_tokens == fake.usages[0]["prompt_tokens"]
    assert response.usage.cost > 0
    body = fake.requests[0]
    system = body["messages"][0]["content"]
    if mode == "json_schema":
        spec = body["response_format"]
        assert spec["type"] == "json_schema" and spec["json_schema"]["strict"] is True
        schema = spec["json_schema"]["schema"]
        assert schema["additionalProperties"] is False
        assert set(schema["required"]) == set(schema["properties"])
        assert "<json_schema>" not in system
    else:
        assert "<json_schema>" in system
        assert ("response_format" in body) is (mode == "json_object")


async def test_nested_schema_validates(make_llm: Any) -> None:
    request = LLMRequest(
        stage="outline", system="blogpipe stage: outline", user="x", output_type=Outline
    )
    response = await within(make_llm().generate(request))
    assert isinstance(response.output, Outline) and response.output.sections


async def test_streaming_feeds_text_and_reports_final_usage(
    make_llm: Any, fake: FakeOpenAI
) -> None:
    fake.cached_tokens, fake.reasoning_tokens = 3, 7
    chunks: list[str] = []

    async def on_text(chunk: str) -> None:
        chunks.append(chunk)

    response = await within(make_llm().generate(_draft(), on_text))

    assert len(chunks) > 5 and "".join(chunks) == response.output
    assert str(response.output).startswith("# Sample Title")
    assert fake.requests[0]["stream_options"] == {"include_usage": True}
    usage = response.usage
    assert usage.prompt_tokens == fake.usages[0]["prompt_tokens"]
    assert usage.completion_tokens == fake.usages[0]["completion_tokens"]
    assert (usage.cached_tokens, usage.reasoning_tokens) == (3, 7)
    assert response.finish_reason == "stop"


async def test_rate_limit_is_retried_by_the_sdk(make_llm: Any, fake: FakeOpenAI) -> None:
    fake.fail("rate_limit", times=2, retry_after_ms=5)
    response = await within(make_llm(max_retries=2).generate(_research()))
    assert isinstance(response.output, ResearchBrief)
    assert fake.calls["research"] == 3


@pytest.mark.parametrize(
    ("kind", "cause"),
    [("rate_limit", openai.RateLimitError), ("server_error", openai.InternalServerError)],
)
async def test_exhausted_retries_are_retryable(
    make_llm: Any,
    fake: FakeOpenAI,
    kind: Any,
    cause: type[Exception],
) -> None:
    fake.fail(kind, times=5)
    with pytest.raises(RetryableError) as caught:
        await within(make_llm(max_retries=1).generate(_research()))
    assert isinstance(caught.value.__cause__, cause)
    assert fake.calls["research"] == 2


async def test_slow_answer_times_out_as_retryable(make_llm: Any, fake: FakeOpenAI) -> None:
    fake.fail("slow", delay=5)
    with pytest.raises(RetryableError) as caught:
        await within(make_llm(timeout=0.3, max_retries=0).generate(_research()))
    assert isinstance(caught.value.__cause__, openai.APITimeoutError)


@pytest.mark.parametrize("mode", STRUCTURED_MODES)
async def test_length_finish_is_retryable_with_usage(
    make_llm: Any, fake: FakeOpenAI, mode: str
) -> None:
    fake.fail("length")
    with pytest.raises(TruncatedOutputError) as caught:
        await within(make_llm(structured_mode=mode).generate(_research()))
    assert caught.value.retryable
    assert caught.value.usage.completion_tokens == fake.usages[0]["completion_tokens"]


async def test_length_finish_while_streaming_is_retryable(make_llm: Any, fake: FakeOpenAI) -> None:
    fake.fail("length")
    with pytest.raises(TruncatedOutputError):
        await within(make_llm().generate(_draft()))


async def test_stream_cut_off_is_retryable(make_llm: Any, fake: FakeOpenAI) -> None:
    fake.fail("drop")
    with pytest.raises(RetryableError, match="interrupted|unexpected|unreachable"):
        await within(make_llm().generate(_draft()))


@pytest.mark.parametrize("mode", STRUCTURED_MODES)
async def test_invalid_json_is_corrected_and_usage_summed(
    make_llm: Any, fake: FakeOpenAI, mode: str
) -> None:
    fake.fail("invalid_json")
    response = await within(make_llm(structured_mode=mode).generate(_research()))

    assert isinstance(response.output, ResearchBrief)
    assert fake.calls["research"] == 2
    retry_messages = fake.requests[1]["messages"]
    assert retry_messages[-2]["role"] == "assistant"
    assert "did not validate" in retry_messages[-1]["content"]
    assert response.usage.prompt_tokens == _sum(fake.usages, "prompt_tokens")
    assert response.usage.completion_tokens == _sum(fake.usages, "completion_tokens")


async def test_invalid_json_every_time_is_retryable_with_all_usage(
    make_llm: Any, fake: FakeOpenAI
) -> None:
    fake.fail("invalid_json", times=3)
    with pytest.raises(InvalidOutputError) as caught:
        await within(make_llm(validation_attempts=3).generate(_research()))
    assert caught.value.retryable
    assert fake.calls["research"] == 3
    assert caught.value.usage.prompt_tokens == _sum(fake.usages, "prompt_tokens")


@pytest.mark.parametrize("mode", STRUCTURED_MODES)
async def test_refusal_is_permanent(make_llm: Any, fake: FakeOpenAI, mode: str) -> None:
    fake.fail("refusal")
    with pytest.raises(PermanentError, match="refused"):
        await within(make_llm(structured_mode=mode).generate(_research()))
    assert fake.calls["research"] == 1


async def test_streamed_refusal_is_permanent(make_llm: Any, fake: FakeOpenAI) -> None:
    fake.fail("refusal")
    with pytest.raises(PermanentError, match="refused"):
        await within(make_llm().generate(_draft()))


@pytest.mark.parametrize("mode", STRUCTURED_MODES)
async def test_content_filter_is_permanent(make_llm: Any, fake: FakeOpenAI, mode: str) -> None:
    fake.fail("content_filter")
    with pytest.raises(PermanentError, match="content filter"):
        await within(make_llm(structured_mode=mode).generate(_research()))


@pytest.mark.parametrize("status", [400, 401, 403, 404])
async def test_client_errors_are_permanent(make_llm: Any, fake: FakeOpenAI, status: int) -> None:
    fake.fail("status", status=status)
    with pytest.raises(PermanentError, match=f"HTTP {status}") as caught:
        await within(make_llm().generate(_research()))
    assert isinstance(caught.value.__cause__, openai.APIStatusError)
    assert fake.calls["research"] == 1


async def test_concurrency_is_limited(make_llm: Any, fake: FakeOpenAI) -> None:
    fake.fail("slow", times=6, delay=0.2)
    llm = make_llm(max_concurrency=2)
    results: list[LLMResponse] = await within(
        asyncio.gather(*(llm.generate(_research()) for _ in range(6)))
    )
    assert len(results) == 6
    assert fake.max_in_flight == 2


def test_cost_uses_the_price_table() -> None:
    price = price_for("gpt-4o-mini-2024-07-18")
    assert price is not None and price == price_for("gpt-4o-mini")
    assert price_for("gpt-4o-2024-08-06") == price_for("gpt-4o")
    assert price_for("my-local-model") is None
    usage = usage_from(
        {
            "prompt_tokens": 1_000_000,
            "completion_tokens": 1_000_000,
            "prompt_tokens_details": {"cached_tokens": 500_000},
            "completion_tokens_details": {"reasoning_tokens": 100},
        },
        price,
    )
    assert usage == Usage(1_000_000, 1_000_000, 500_000, 100, round(0.075 + 0.0375 + 0.60, 8))
    assert usage_from({"prompt_tokens": 10, "completion_tokens": 5}, None).cost == 0.0


async def test_factory_builds_the_openai_provider(fake: FakeOpenAI) -> None:
    settings = _settings(fake).with_changes(
        openai_structured_mode="json_object", llm_max_concurrency=3
    )
    llm = build_llm(settings)
    try:
        assert isinstance(llm, OpenAILLM) and llm.name == "openai"
        assert llm.structured_mode == "json_object"
        response = await within(llm.generate(_research()))
        assert isinstance(response.output, ResearchBrief)
        assert fake.requests[0]["response_format"] == {"type": "json_object"}
    finally:
        await within(llm.close())


def test_unknown_structured_mode_is_a_config_error(fake: FakeOpenAI) -> None:
    with pytest.raises(ConfigError, match="OPENAI_STRUCTURED_MODE"):
        OpenAILLM(_settings(fake), structured_mode="xml")


@pytest.mark.parametrize("mode", STRUCTURED_MODES)
async def test_refusal_records_the_usage_spent(make_llm: Any, fake: FakeOpenAI, mode: str) -> None:
    fake.fail("refusal")
    with pytest.raises(RefusedError) as caught:
        await within(make_llm(structured_mode=mode).generate(_research()))
    assert not caught.value.retryable
    assert caught.value.usage.completion_tokens == fake.usages[0]["completion_tokens"] > 0


async def test_streamed_refusal_records_the_usage_spent(make_llm: Any, fake: FakeOpenAI) -> None:
    fake.fail("refusal")
    with pytest.raises(RefusedError) as caught:
        await within(make_llm().generate(_draft()))
    assert caught.value.usage.prompt_tokens == fake.usages[0]["prompt_tokens"]


async def test_invalid_json_error_records_attempts(make_llm: Any, fake: FakeOpenAI) -> None:
    fake.fail("invalid_json", times=2)
    with pytest.raises(InvalidOutputError) as caught:
        await within(make_llm(validation_attempts=2).generate(_research()))
    assert caught.value.attempts == 2 == fake.calls["research"]


async def test_rate_limit_honours_retry_after_ms_and_records_usage(
    make_llm: Any, fake: FakeOpenAI
) -> None:
    # retry-after-ms of 5 ms: the SDK waits that long rather than its default backoff.
    fake.fail("rate_limit", times=2, retry_after_ms=5)
    started = asyncio.get_running_loop().time()
    response = await within(make_llm(max_retries=2).generate(_research()))
    assert asyncio.get_running_loop().time() - started < 1.5
    assert fake.calls["research"] == 3
    assert response.usage.prompt_tokens == fake.usages[-1]["prompt_tokens"]


async def test_a_stage_can_use_its_own_model(fake: FakeOpenAI) -> None:
    settings = _settings(fake).with_changes(openai_stage_models={"draft": "gpt-4o"})
    llm = OpenAILLM(settings, timeout=5.0)
    try:
        research = await within(llm.generate(_research()))
        draft = await within(llm.generate(_draft()))
    finally:
        await within(llm.close())
    assert [body["model"] for body in fake.requests] == ["gpt-4o-mini", "gpt-4o"]
    assert (research.model, draft.model) == ("gpt-4o-mini", "gpt-4o")
    assert draft.usage.cost > 0
