"""The LLM port. Stages describe what they want (prompt, output model, offline stand-in);
a provider (``openai`` or ``offline``) produces it and reports usage."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import BaseModel

TextCallback = Callable[[str], Awaitable[None]]
"""Called with each chunk of streamed text (the draft stage moves progress with it)."""


@dataclass(frozen=True)
class Usage:
    """Tokens and cost of one or more LLM calls."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    cost: float = 0.0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            self.cached_tokens + other.cached_tokens,
            self.reasoning_tokens + other.reasoning_tokens,
            self.cost + other.cost,
        )


@dataclass(frozen=True)
class LLMRequest:
    """One generation: instructions, user data (kept apart from instructions), and the
    pydantic model the answer must validate against (None for free Markdown text)."""

    stage: str
    system: str
    user: str
    output_type: type[BaseModel] | None = None
    offline: Callable[[], BaseModel | str] | None = None
    stream: bool = False
    max_tokens: int | None = None
    temperature: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LLMResponse:
    """What came back: a validated model instance or text, with usage and provenance."""

    output: BaseModel | str
    usage: Usage
    provider: str
    model: str
    finish_reason: str | None = None


class LLM(Protocol):
    """A provider of generations."""

    name: str

    async def generate(
        self, request: LLMRequest, on_text: TextCallback | None = None
    ) -> LLMResponse:
        """Run one generation (streaming chunks to ``on_text`` when asked)."""

    async def close(self) -> None:
        """Release HTTP connections."""
