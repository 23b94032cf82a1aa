"""The runner writes in-stage progress at most once per interval."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

import stages.runner as runner_module
from core.db.pipeline import Claim
from core.llm import LLM, Usage
from core.settings import Settings
from stages.base import StageInput, StageResult
from stages.runner import StageRunner


class ReportingStage:
    name = "draft"

    async def run(self, stage_input: StageInput, llm: LLM) -> StageResult:
        for fraction in (0.25, 0.5, 0.75):
            await stage_input.report(fraction, f"{fraction:.0%} written")
        return StageResult(output={}, usage=Usage(), provider="offline", model="offline")


class RecordingStore:
    lease_seconds = 30.0
    engine = None

    def __init__(self) -> None:
        self.progress: list[float] = []

    async def report_progress(self, claim: Claim, percentage: float, details: str) -> None:
        self.progress.append(percentage)

    async def heartbeat(self, claim: Claim) -> None:
        return None


def claim() -> Claim:
    request = {"topic": "A topic", "keywords": ["k"]}
    return Claim(
        job_id=uuid.uuid4(), stage="draft", generation=1, run_id=1, attempt=1, request=request
    )


@pytest.mark.parametrize(("interval", "expected"), [(0.0, [57.5, 65.0, 72.5]), (3600.0, [])])
async def test_progress_is_throttled(
    monkeypatch: pytest.MonkeyPatch, interval: float, expected: list[float]
) -> None:
    monkeypatch.setattr(runner_module, "PROGRESS_INTERVAL", interval)
    store = RecordingStore()
    runner = StageRunner(ReportingStage(), store, llm=Any, settings=Settings())  # type: ignore[arg-type]
    await asyncio.wait_for(runner._run(*runner_module._with_parsed_request(claim())), timeout=5)
    assert store.progress == expected


class HeartbeatCountingStore(RecordingStore):
    lease_seconds = 1.5  # an extension every 0.5 s

    def __init__(self, enough: int) -> None:
        super().__init__()
        self.heartbeats = 0
        self.enough = enough
        self.released = asyncio.Event()

    async def heartbeat(self, claim: Claim) -> None:
        self.heartbeats += 1
        if self.heartbeats >= self.enough:
            self.released.set()


class WaitingStage:
    """Runs until its store has extended the lease enough times."""

    name = "draft"

    def __init__(self, store: HeartbeatCountingStore) -> None:
        self.store = store

    async def run(self, stage_input: StageInput, llm: LLM) -> StageResult:
        await self.store.released.wait()
        return StageResult(output={}, usage=Usage(), provider="offline", model="offline")


def lease_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("lease-")]


async def test_a_long_stage_keeps_extending_its_lease_and_stops_when_it_ends() -> None:
    store = HeartbeatCountingStore(enough=2)
    runner = StageRunner(WaitingStage(store), store, llm=Any, settings=Settings())  # type: ignore[arg-type]
    await asyncio.wait_for(runner._run(*runner_module._with_parsed_request(claim())), timeout=10)
    assert store.heartbeats == 2
    assert lease_tasks() == []


async def test_a_short_stage_extends_no_lease() -> None:
    store = HeartbeatCountingStore(enough=1)
    runner = StageRunner(ReportingStage(), store, llm=Any, settings=Settings())  # type: ignore[arg-type]
    await asyncio.wait_for(runner._run(*runner_module._with_parsed_request(claim())), timeout=5)
    assert store.heartbeats == 0
    assert lease_tasks() == []
