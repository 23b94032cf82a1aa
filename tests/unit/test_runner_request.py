"""A job's request is validated once per process: the stage that claimed it from the
database validates it, and the claims it opens for the next stages carry the model on."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from pydantic import ValidationError

from core.broker import Delivery
from core.db.pipeline import Claim, StageOutcome
from core.events import StageMessage
from core.llm import LLM, Usage
from core.requests import BlogRequest
from core.settings import Settings
from stages.base import StageInput, StageResult
from stages.runner import StageRunner, _with_parsed_request

STORED = {"topic": "Indoor plants", "keywords": ["plants"], "length": "short"}


def claim(request: dict[str, Any] | BlogRequest) -> Claim:
    return Claim(
        job_id=uuid.uuid4(), stage="outline", generation=1, run_id=7, attempt=1, request=request
    )


def test_a_stored_request_is_validated_and_a_validated_one_is_kept() -> None:
    stored = claim(STORED)
    validated, request = _with_parsed_request(stored)
    assert request == BlogRequest.model_validate(STORED)
    assert validated.request is request and validated.run_id == stored.run_id
    again, same = _with_parsed_request(validated)
    assert again is validated and same is request
    with pytest.raises(ValidationError):
        _with_parsed_request(claim({"topic": "x", "keywords": []}))


class EchoStage:
    name = "outline"

    def __init__(self) -> None:
        self.requests: list[BlogRequest] = []

    async def run(self, stage_input: StageInput, llm: LLM) -> StageResult:
        self.requests.append(stage_input.request)
        return StageResult(output={"ok": True}, usage=Usage(), provider="p", model="m")


class OpenedStore:
    """Hands the runner a claim as a hand-over would, and records what it completes."""

    lease_seconds = 30.0
    engine = None

    def __init__(self, opened: Claim) -> None:
        self.opened = opened
        self.completed: list[Claim] = []
        self.failures: list[BaseException] = []

    def take_opened(self, message_id: str, message: StageMessage) -> Claim:
        return self.opened

    async def complete(self, claim: Claim, outcome: StageOutcome, **_: Any) -> str:
        self.completed.append(claim)
        return "committed"

    async def record_failure(self, claim: Claim, error: BaseException, **_: Any) -> None:
        self.failures.append(error)

    async def fail_job(self, *args: Any) -> None:
        return None

    async def heartbeat(self, claim: Claim) -> None:
        return None


async def test_the_claim_a_stage_completes_carries_the_validated_request() -> None:
    opened = claim(STORED)
    store = OpenedStore(opened)
    stage = EchoStage()
    runner = StageRunner(stage, store, llm=Any, settings=Settings())  # type: ignore[arg-type]
    message = StageMessage(opened.job_id, "outline", 1).to_message()
    delivery = Delivery("m-1", message.data, dict(message.attributes), 1, "blog-outline")
    await asyncio.wait_for(runner.handle(delivery), timeout=5)
    assert [type(r) for r in stage.requests] == [BlogRequest]
    [completed] = store.completed
    assert completed.request is stage.requests[0]
    assert (completed.job_id, completed.run_id) == (opened.job_id, opened.run_id)


async def test_a_stored_request_that_no_longer_validates_fails_the_stage_run() -> None:
    store = OpenedStore(claim({"topic": "x", "keywords": []}))
    runner = StageRunner(EchoStage(), store, llm=Any, settings=Settings())  # type: ignore[arg-type]
    message = StageMessage(store.opened.job_id, "outline", 1).to_message()
    delivery = Delivery("m-2", message.data, dict(message.attributes), 1, "blog-outline")
    with pytest.raises(Exception, match="validation error"):
        await asyncio.wait_for(runner.handle(delivery), timeout=5)
    assert [type(e) for e in store.failures] == [ValidationError]
    assert store.completed == []
