"""Messages on the wire. They carry ids only; inputs and outputs live in Postgres."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

import orjson

from core import jsonbytes
from core.broker import Message


@dataclass(frozen=True)
class StageMessage:
    """Tells a stage to run for a job at a generation (topics ``blog-<stage>``)."""

    job_id: UUID
    stage: str
    generation: int

    def to_message(self) -> Message:
        body = {"job_id": str(self.job_id), "stage": self.stage, "generation": self.generation}
        return Message(data=jsonbytes.dumps(body), attributes={"stage": self.stage})

    @classmethod
    def from_bytes(cls, data: bytes) -> StageMessage:
        body = orjson.loads(data)
        return cls(
            job_id=UUID(body["job_id"]),
            stage=str(body["stage"]),
            generation=int(body["generation"]),
        )


@dataclass(frozen=True)
class JobEvent:
    """A job lifecycle event (``job.completed``, ``job.failed``, ``job.cancelled``,
    ``job.progress``) on topic ``blog-job-events``; the notifier turns it into webhooks."""

    event_id: str
    type: str
    job_id: UUID
    generation: int
    occurred_at: datetime

    def to_message(self) -> Message:
        body = {
            "event_id": self.event_id,
            "type": self.type,
            "job_id": str(self.job_id),
            "generation": self.generation,
            "occurred_at": self.occurred_at.isoformat(),
        }
        return Message(data=jsonbytes.dumps(body), attributes={"type": self.type})

    @classmethod
    def from_bytes(cls, data: bytes) -> JobEvent:
        body = orjson.loads(data)
        return cls(
            event_id=str(body["event_id"]),
            type=str(body["type"]),
            job_id=UUID(body["job_id"]),
            generation=int(body["generation"]),
            occurred_at=datetime.fromisoformat(body["occurred_at"]),
        )
