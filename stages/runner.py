"""The subscriber runner: wraps any stage in claim → run → commit → hand off.

The broker delivers ``StageMessage``s; the runner decides what each means. A stale,
duplicate or foreign message is acked and dropped. A retryable failure is recorded and
nacked (the broker retries with backoff and dead-letters after the configured
attempts); a permanent one fails the job at once. The dead-letter handler marks the
job failed at the stage with the last error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import replace
from typing import Any

from pydantic import ValidationError

from core.broker import Delivery, Nack
from core.constants import STAGE_PROGRESS
from core.db.dead_letters import DeadLetterStore
from core.db.pipeline import Claim, PipelineStore, Skip, StageOutcome
from core.errors import StageError
from core.events import StageMessage
from core.llm import LLM, Usage
from core.requests import BlogRequest
from core.settings import Settings
from stages.base import Stage, StageInput, StageResult
from stages.result import build_result

logger = logging.getLogger("blogpipe.stages")

PROGRESS_INTERVAL = 1.0
"""Seconds between in-stage progress writes (the draft reports as text streams in)."""


class StageRunner:
    """Runs one stage for every message on its subscription."""

    def __init__(self, stage: Stage, store: PipelineStore, llm: LLM, settings: Settings) -> None:
        self.stage = stage
        self.store = store
        self.llm = llm
        self.settings = settings
        self.dead_letters = DeadLetterStore(
            store, max_attempts=settings.max_delivery_attempts, max_redrives=settings.max_redrives
        )

    async def handle(self, delivery: Delivery) -> None:
        """Handle one delivery: return to ack, raise ``Nack`` to retry."""
        try:
            message = StageMessage.from_bytes(delivery.data)
        except Exception:
            logger.error(
                "Dropping malformed message %s on %s",
                delivery.message_id,
                delivery.subscription,
                extra={"action": "message_malformed"},
            )
            return
        if message.stage != self.stage.name:
            logger.error(
                "Dropping %s message delivered to the %s stage",
                message.stage,
                self.stage.name,
                extra={"action": "message_misrouted"},
            )
            return
        claim = self.store.take_opened(delivery.message_id, message) or await self.store.claim(
            message
        )
        if isinstance(claim, Skip):
            self._log_skip(message, claim)
            if claim.reason == "leased":
                # Another worker is running it now; look again when its lease would end.
                raise Nack("stage run is leased by another worker", delay=claim.retry_after)
            return
        # Job-level lines (queued, started, completed, failed) are INFO; per-stage lines
        # are DEBUG, so the log stays readable at thousands of jobs.
        logger.debug(
            "Stage %s started for job %s (attempt %d)",
            self.stage.name,
            claim.job_id,
            claim.attempt,
            extra=self._extra(claim, "stage_started"),
        )
        started = time.monotonic()
        try:
            claim, request = _with_parsed_request(claim)
            result = await self._run(claim, request)
        except Exception as exc:
            await self._failed(claim, exc, delivery)
            return
        outcome = StageOutcome(
            output=_with_warnings(result),
            provider=result.provider,
            model=result.model,
            prompt_tokens=result.usage.prompt_tokens,
            completion_tokens=result.usage.completion_tokens,
            cost=result.usage.cost,
        )
        state = await self.store.complete(claim, outcome, finalize=build_result, delivery=delivery)
        # Each run's timing and outcome is in stage_runs (the job's "stages" view); the log
        # line is DEBUG when the stage committed, INFO when its work was thrown away.
        logger.log(
            logging.DEBUG if state == "committed" else logging.INFO,
            "Stage %s %s for job %s in %.3fs",
            self.stage.name,
            state,
            claim.job_id,
            time.monotonic() - started,
            extra=self._extra(
                claim, "stage_finished" if state == "committed" else "stage_discarded"
            ),
        )

    async def handle_dead_letter(self, delivery: Delivery) -> None:
        """A message exhausted its attempts: fail the job at this stage, or re-drive it when
        the attempts were lost to dead workers rather than spent on errors."""
        try:
            message = StageMessage.from_bytes(delivery.data)
        except Exception:
            logger.error(
                "Dropping malformed dead letter %s",
                delivery.message_id,
                extra={"action": "dead_letter_malformed"},
            )
            return
        raw = delivery.attributes.get("x-delivery-attempts") or delivery.attributes.get(
            "CloudPubSubDeadLetterSourceDeliveryCount"
        )
        attempts = int(raw) if raw and str(raw).isdigit() else None
        await self.dead_letters.handle(
            message,
            subscription=delivery.subscription,
            message_id=delivery.message_id,
            attempts=attempts,
        )

    async def _run(self, claim: Claim, request: BlogRequest) -> StageResult:
        start, end = STAGE_PROGRESS[self.stage.name]

        last_report = time.monotonic()

        async def report(fraction: float, details: str) -> None:
            # Pollers look every few seconds: progress within a stage is written at most
            # once per PROGRESS_INTERVAL, so a fast stage costs no extra transactions.
            nonlocal last_report
            now = time.monotonic()
            if now - last_report < PROGRESS_INTERVAL:
                return
            last_report = now
            fraction = min(1.0, max(0.0, fraction))
            await self.store.report_progress(
                claim, round(start + (end - start) * fraction, 1), details
            )

        stage_input = StageInput(
            request=request,
            outputs=claim.outputs,
            settings=self.settings,
            job_id=claim.job_id,
            report=report,
        )
        lease = _LeaseKeeper(self, claim)
        try:
            return await self.stage.run(stage_input, self.llm)
        finally:
            await lease.stop()

    async def _heartbeat(self, claim: Claim) -> None:
        """Extend the claim's lease once; a failure is logged (the next one may succeed,
        else the lease runs out and the stage is redelivered)."""
        try:
            await self.store.heartbeat(claim)
        except Exception:
            logger.warning(
                "Could not extend lease of job %s",
                claim.job_id,
                extra=self._extra(claim, "lease_extend_failed"),
            )

    async def _failed(self, claim: Claim, exc: Exception, delivery: Delivery) -> None:
        retryable = _is_retryable(exc)
        spent = getattr(exc, "usage", None)
        usage = spent if isinstance(spent, Usage) else None
        await self.store.record_failure(claim, exc, retryable=retryable, usage=usage)
        if retryable:
            logger.warning(
                "Stage %s attempt %d failed for job %s: %s",
                self.stage.name,
                claim.attempt,
                claim.job_id,
                exc,
                extra=self._extra(claim, "stage_retry"),
            )
            raise Nack(f"{type(exc).__name__}: {exc}") from exc
        text = f"Stage {self.stage.name} failed: {exc}"
        details = {
            "type": type(exc).__name__,
            "message": str(exc),
            "attempts": claim.attempt,
            "stage": self.stage.name,
        }
        await self.store.fail_job(claim.job_id, claim.generation, self.stage.name, text, details)

    def _log_skip(self, message: StageMessage, skip: Skip) -> None:
        logger.info(
            "Skipping %s message for job %s: %s",
            message.stage,
            message.job_id,
            skip.reason,
            extra={
                "action": f"message_{skip.reason}",
                "job_id": str(message.job_id),
                "stage": message.stage,
            },
        )

    def _extra(self, claim: Claim, action: str) -> dict[str, Any]:
        return {
            "action": action,
            "job_id": str(claim.job_id),
            "stage": self.stage.name,
            "generation": claim.generation,
            "attempt": claim.attempt,
        }


class _LeaseKeeper:
    """Extends a running claim's lease every third of the lease (at least every 0.5 s)
    until stopped. A timer, not a task, waits for each extension: most stages end before
    the first is due, and then cost one cancelled timer rather than a task started and
    cancelled (thousands of runs in flight hold no task each for it either)."""

    __slots__ = ("_claim", "_handle", "_interval", "_runner", "_stopped", "_task")

    def __init__(self, runner: StageRunner, claim: Claim) -> None:
        self._runner = runner
        self._claim = claim
        self._interval = max(0.5, runner.store.lease_seconds / 3)
        self._task: asyncio.Task[None] | None = None
        self._stopped = False
        self._handle = asyncio.get_running_loop().call_later(self._interval, self._due)

    def _due(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self._extend(), name=f"lease-{self._claim.job_id}"
        )

    async def _extend(self) -> None:
        try:
            await self._runner._heartbeat(self._claim)
        finally:
            if not self._stopped:
                self._handle = asyncio.get_running_loop().call_later(self._interval, self._due)

    async def stop(self) -> None:
        """No further extensions; one in flight is cancelled and waited for."""
        self._stopped = True
        self._handle.cancel()
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _with_parsed_request(claim: Claim) -> tuple[Claim, BlogRequest]:
    """The claim with its job's request validated: a claim read from the database has it
    as stored, one opened by the previous stage in this process has the model that stage
    ran with (the next stage's claim carries it on, so a job's request is validated once
    per process, not once per stage)."""
    if isinstance(claim.request, BlogRequest):
        return claim, claim.request
    request = BlogRequest.model_validate(claim.request)
    return replace(claim, request=request), request


def _is_retryable(exc: Exception) -> bool:
    if isinstance(exc, StageError):
        return exc.retryable
    if isinstance(exc, ValidationError):
        return True  # invalid structured output: another attempt may get it right
    return True


def _with_warnings(result: StageResult) -> dict[str, Any]:
    if not result.warnings:
        return result.output
    output = dict(result.output)
    output["warnings"] = list(dict.fromkeys([*output.get("warnings", []), *result.warnings]))
    return output
