"""What every stage is: pure "inputs → output" logic over the LLM port."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol
from uuid import UUID

from core.llm import LLM, Usage
from core.requests import BlogRequest
from core.settings import Settings

ProgressReporter = Callable[[float, str], Awaitable[None]]
"""Report progress within a stage: a fraction 0..1 of the stage and a short detail."""


async def no_progress(fraction: float, details: str) -> None:
    """A reporter that ignores progress (sync mode, tests)."""


@dataclass(frozen=True)
class StageInput:
    """Everything a stage may read: the request and the outputs of earlier stages."""

    request: BlogRequest
    outputs: Mapping[str, Mapping[str, Any]]
    settings: Settings
    job_id: UUID | None = None
    report: ProgressReporter = no_progress


@dataclass(frozen=True)
class StageResult:
    """A stage's JSON output with the usage and provenance of the LLM calls behind it."""

    output: dict[str, Any]
    usage: Usage
    provider: str
    model: str
    warnings: tuple[str, ...] = field(default_factory=tuple)


class Stage(Protocol):
    """One step of the pipeline."""

    name: str

    async def run(self, stage_input: StageInput, llm: LLM) -> StageResult:
        """Produce this stage's output from its inputs."""


def warm(stage: Stage) -> None:
    """Run the stage's ``warm()`` if it has one: what it loads once (tables, dictionaries)
    is loaded before the first message rather than during it."""
    warming = getattr(stage, "warm", None)
    if warming is not None:
        warming()
