"""The ``openai`` provider: the official SDK against any OpenAI-compatible endpoint.

The only module that imports ``openai``. Structured answers are validated by the
stage's pydantic model in one of three modes:

- ``json_schema``: ``chat.completions.parse(response_format=Model)`` (strict schema);
- ``json_object``: JSON mode, the schema given in the system prompt;
- ``prompt``: no response format at all, the schema in the prompt (for servers
  that support neither).

An answer that does not validate is sent back with the validation error, up to
``validation_attempts`` times; usage is summed over every attempt. Free text is
streamed (``stream_options.include_usage``) to the caller's ``on_text``. SDK errors are
translated to ``RetryableError`` / ``PermanentError`` at this edge.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

import httpx2
import openai
from pydantic import BaseModel, ValidationError

from core.errors import ConfigError, PermanentError, RetryableError, StageError
from core.llm import LLMRequest, LLMResponse, TextCallback, Usage
from core.settings import Settings

StructuredMode = Literal["json_schema", "json_object", "prompt"]
STRUCTURED_MODES: tuple[str, ...] = get_args(StructuredMode)
_FENCED = re.compile(r"^\s*```(?:json)?\s*\n?(.*?)\n?```\s*$", re.DOTALL)
_RETRYABLE_STATUS = frozenset({408, 409, 429})


@dataclass(frozen=True)
class Price:
    """USD per million tokens."""

    input: float
    cached_input: float
    output: float


# Published list prices (USD / 1M tokens). Dated snapshots match by prefix; an
# unknown model costs 0 rather than a guess.
PRICES: dict[str, Price] = {
    "gpt-4o-mini": Price(0.15, 0.075, 0.60),
    "gpt-4o": Price(2.50, 1.25, 10.00),
    "gpt-4.1-nano": Price(0.10, 0.025, 0.40),
    "gpt-4.1-mini": Price(0.40, 0.10, 1.60),
    "gpt-4.1": Price(2.00, 0.50, 8.00),
    "gpt-5-nano": Price(0.05, 0.005, 0.40),
    "gpt-5-mini": Price(0.25, 0.025, 2.00),
    "gpt-5": Price(1.25, 0.125, 10.00),
    "o4-mini": Price(1.10, 0.275, 4.40),
    "o3": Price(2.00, 0.50, 8.00),
}


def price_for(model: str, prices: Mapping[str, Price] = PRICES) -> Price | None:
    """The price of ``model`` (longest matching name prefix), or None if unknown."""
    matches = [name for name in prices if model == name or model.startswith(f"{name}-")]
    return prices[max(matches, key=len)] if matches else None


def usage_from(data: Mapping[str, Any] | None, price: Price | None) -> Usage:
    """Usage (and cost) from an API ``usage`` object; reasoning tokens bill as output."""
    if not data:
        return Usage()
    prompt = int(data.get("prompt_tokens") or 0)
    completion = int(data.get("completion_tokens") or 0)
    cached = int((data.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    reasoning = int((data.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0)
    cost = 0.0
    if price is not None:
        cost = (
            (prompt - cached) * price.input
            + cached * price.cached_input
            + completion * price.output
        ) / 1_000_000
    return Usage(prompt, completion, cached, reasoning, round(cost, 8))


class InvalidOutputError(RetryableError):
    """The answer never validated against the stage's model; carries the usage spent."""

    def __init__(self, message: str, usage: Usage, attempts: int = 1) -> None:
        super().__init__(message)
        self.usage = usage
        self.attempts = attempts


class TruncatedOutputError(RetryableError):
    """The answer hit the token limit (``finish_reason: length``); carries the usage spent."""

    def __init__(self, message: str, usage: Usage) -> None:
        super().__init__(message)
        self.usage = usage


class RefusedError(PermanentError):
    """The model refused or the content filter stopped it; carries the usage spent."""

    def __init__(self, message: str, usage: Usage) -> None:
        super().__init__(message)
        self.usage = usage


def translate_error(exc: openai.OpenAIError) -> StageError:
    """The domain error for an SDK error (the SDK has already retried what it retries)."""
    name = type(exc).__name__
    if isinstance(exc, openai.LengthFinishReasonError):
        return RetryableError(f"OpenAI answer truncated at the token limit ({name})")
    if isinstance(exc, openai.ContentFilterFinishReasonError):
        return PermanentError(f"OpenAI content filter rejected the request ({name})")
    if isinstance(exc, openai.APIConnectionError):  # includes APITimeoutError
        return RetryableError(f"OpenAI unreachable or too slow ({name}): {exc}")
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        retryable = status in _RETRYABLE_STATUS or status >= 500
        kind = RetryableError if retryable else PermanentError
        return kind(f"OpenAI returned HTTP {status} ({name}): {exc.message}")
    if isinstance(exc, openai.APIError):
        # Unexpected bodies and error events in the middle of a stream: transient.
        return RetryableError(f"OpenAI returned an unexpected response ({name}): {exc}")
    return PermanentError(f"OpenAI client error ({name}): {exc}")


def _schema_instructions(model: type[BaseModel]) -> str:
    schema = json.dumps(model.model_json_schema(), separators=(",", ":"))
    return (
        "\n\nAnswer with exactly one JSON object and nothing else (no prose, no code "
        "fences). It must validate against this JSON schema:\n"
        f"<json_schema>\n{schema}\n</json_schema>"
    )


def _unfenced(content: str) -> str:
    match = _FENCED.match(content)
    return match.group(1) if match else content


def _correction(error: ValidationError | str) -> str:
    detail = str(error)[:2000]
    return (
        "Your previous answer did not validate against the required schema:\n"
        f"{detail}\nAnswer again with only a corrected JSON object."
    )


class OpenAILLM:
    """Generations through ``openai.AsyncOpenAI``, with a per-process concurrency limit."""

    name = "openai"

    def __init__(
        self,
        settings: Settings,
        *,
        structured_mode: str = "json_schema",
        max_concurrency: int = 16,
        timeout: float = 120.0,
        max_retries: int = 2,
        validation_attempts: int = 3,
        prices: Mapping[str, Price] = PRICES,
    ) -> None:
        if structured_mode not in STRUCTURED_MODES:
            raise ConfigError(
                f"OPENAI_STRUCTURED_MODE must be one of {', '.join(STRUCTURED_MODES)}; "
                f"got {structured_mode!r}"
            )
        if max_concurrency < 1 or validation_attempts < 1:
            raise ConfigError("max_concurrency and validation_attempts must be at least 1")
        self.model = settings.openai_model
        self.stage_models = dict(settings.openai_stage_models)
        self.structured_mode = structured_mode
        self.validation_attempts = validation_attempts
        self.prices = prices
        self._slots = asyncio.Semaphore(max_concurrency)
        self._client = openai.AsyncOpenAI(
            # A local OpenAI-compatible server may need no key; the SDK insists on one.
            api_key=settings.openai_api_key or "not-needed",
            base_url=settings.openai_base_url,
            timeout=timeout,
            max_retries=max_retries,
        )

    async def generate(
        self, request: LLMRequest, on_text: TextCallback | None = None
    ) -> LLMResponse:
        """One generation: structured when the request names a model, else (streamed) text."""
        async with self._slots:
            try:
                if request.output_type is None:
                    return await self._text(request, on_text)
                return await self._structured(request, request.output_type)
            except openai.OpenAIError as exc:
                raise translate_error(exc) from exc
            except httpx2.TransportError as exc:
                # A connection dropped while a stream was being read (the SDK wraps only
                # errors raised while sending).
                raise RetryableError(f"OpenAI stream interrupted: {exc!r}") from exc

    async def close(self) -> None:
        """Release HTTP connections."""
        await self._client.close()

    def _usage(self, data: Mapping[str, Any] | None, model: str) -> Usage:
        return usage_from(data, price_for(model, self.prices))

    def _options(self, request: LLMRequest) -> dict[str, Any]:
        options: dict[str, Any] = {"model": self.stage_models.get(request.stage, self.model)}
        if request.max_tokens is not None:
            options["max_completion_tokens"] = request.max_tokens
        if request.temperature is not None:
            options["temperature"] = request.temperature
        return options

    def _messages(self, request: LLMRequest, schema_in_prompt: type[BaseModel] | None) -> list[Any]:
        system = request.system
        if schema_in_prompt is not None:
            system += _schema_instructions(schema_in_prompt)
        return [{"role": "system", "content": system}, {"role": "user", "content": request.user}]

    async def _structured(self, request: LLMRequest, model: type[BaseModel]) -> LLMResponse:
        in_prompt = None if self.structured_mode == "json_schema" else model
        messages = self._messages(request, in_prompt)
        total = Usage()
        last_error: ValidationError | str = "no answer"
        for _attempt in range(self.validation_attempts):
            content, parsed, usage, served_by = await self._structured_once(
                request, model, messages, total
            )
            total += usage
            if parsed is not None:
                return LLMResponse(parsed, total, self.name, served_by, "stop")
            try:
                return LLMResponse(
                    model.model_validate_json(_unfenced(content or "")),
                    total,
                    self.name,
                    served_by,
                    "stop",
                )
            except ValidationError as exc:
                last_error = exc
            messages = [
                *messages,
                {"role": "assistant", "content": content or ""},
                {"role": "user", "content": _correction(last_error)},
            ]
        raise InvalidOutputError(
            f"{request.stage}: the answer did not validate as {model.__name__} after "
            f"{self.validation_attempts} attempts: {str(last_error)[:500]}",
            total,
            self.validation_attempts,
        )

    async def _structured_once(
        self, request: LLMRequest, model: type[BaseModel], messages: list[Any], spent: Usage
    ) -> tuple[str | None, BaseModel | None, Usage, str]:
        """One call: the raw content, the parsed model if the SDK parsed it, usage, model."""
        options = self._options(request)
        if self.structured_mode != "json_schema":
            if self.structured_mode == "json_object":
                options["response_format"] = {"type": "json_object"}
            completion = await self._client.chat.completions.create(messages=messages, **options)
            usage = self._usage(
                completion.usage.model_dump() if completion.usage else None, completion.model
            )
            choice = completion.choices[0]
            self._check_finish(request, choice.finish_reason, choice.message.refusal, spent + usage)
            return choice.message.content, None, usage, completion.model
        raw = await self._client.chat.completions.with_raw_response.parse(
            messages=messages, response_format=model, **options
        )
        data = raw.http_response.json()
        served_by = str(data.get("model") or options["model"])
        usage = self._usage(data.get("usage"), served_by)
        try:
            parsed = raw.parse()
        except openai.LengthFinishReasonError as exc:
            raise TruncatedOutputError(
                f"{request.stage}: the answer hit the token limit", spent + usage
            ) from exc
        except openai.ContentFilterFinishReasonError as exc:
            raise RefusedError(
                f"{request.stage}: rejected by the content filter", spent + usage
            ) from exc
        except ValidationError:
            content = (data.get("choices") or [{}])[0].get("message", {}).get("content")
            return content, None, usage, served_by
        message = parsed.choices[0].message
        self._check_finish(request, None, message.refusal, spent + usage)
        return message.content, message.parsed, usage, served_by

    def _check_finish(
        self, request: LLMRequest, finish: str | None, refusal: str | None, spent: Usage
    ) -> None:
        """Refusals and content filters are permanent; truncation is retryable."""
        if refusal:
            raise RefusedError(f"{request.stage}: the model refused: {refusal[:300]}", spent)
        if finish == "content_filter":
            raise RefusedError(f"{request.stage}: rejected by the content filter", spent)
        if finish == "length":
            raise TruncatedOutputError(f"{request.stage}: the answer hit the token limit", spent)

    async def _text(self, request: LLMRequest, on_text: TextCallback | None) -> LLMResponse:
        messages = self._messages(request, None)
        options = self._options(request)
        if not request.stream:
            completion = await self._client.chat.completions.create(messages=messages, **options)
            usage = self._usage(
                completion.usage.model_dump() if completion.usage else None, completion.model
            )
            choice = completion.choices[0]
            self._check_finish(request, choice.finish_reason, choice.message.refusal, usage)
            text = choice.message.content or ""
            if on_text is not None and text:
                await on_text(text)
            return LLMResponse(text, usage, self.name, completion.model, choice.finish_reason)
        parts: list[str] = []
        refusal: list[str] = []
        finish: str | None = None
        usage = Usage()
        served_by = str(options["model"])
        stream = await self._client.chat.completions.create(
            messages=messages, stream=True, stream_options={"include_usage": True}, **options
        )
        async with stream:
            async for chunk in stream:
                served_by = chunk.model or served_by
                if chunk.usage is not None:
                    usage = self._usage(chunk.usage.model_dump(), served_by)
                for choice in chunk.choices:
                    if choice.delta.content:
                        parts.append(choice.delta.content)
                        if on_text is not None:
                            await on_text(choice.delta.content)
                    if choice.delta.refusal:
                        refusal.append(choice.delta.refusal)
                    finish = choice.finish_reason or finish
        self._check_finish(request, finish, "".join(refusal), usage)
        return LLMResponse("".join(parts), usage, self.name, served_by, finish)
