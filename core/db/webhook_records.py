"""Webhook records: deliveries, attempts, endpoints, and what the notifier's steps return."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Literal
from uuid import UUID

from core.db.jobs import JobRecord, status_document

PENDING: Final = "pending"
SENDING: Final = "sending"
SUCCEEDED: Final = "succeeded"
FAILED: Final = "failed"
HELD: Final = "held"
SKIPPED: Final = "skipped"
PROGRESS_EVENT: Final = "job.progress"
EXCERPT_LIMIT: Final = 2048

_NAMESPACE: Final = UUID("6f0c7a52-8d0e-4f53-9a53-3b1c1b7e2c11")


Health = Literal["success", "failure"]
"""How an attempt counts for its endpoint's health (a refused one does not count)."""


def delivery_id_for(event_id: str) -> UUID:
    """The delivery id of an event: deterministic, so a redelivered event maps to the same one."""
    return uuid.uuid5(_NAMESPACE, event_id)


@dataclass(frozen=True)
class WebhookDelivery:
    """A row of ``webhook_deliveries``: one event for one endpoint."""

    id: UUID
    job_id: UUID
    tenant: str
    event_id: str
    event_type: str
    url: str
    payload: dict[str, Any]
    status: str
    attempt_count: int
    next_attempt_at: datetime | None
    last_status_code: int | None
    last_error: str | None
    created_at: datetime
    updated_at: datetime
    delivered_at: datetime | None
    occurred_at: datetime
    trigger: str

    @property
    def message_id(self) -> str:
        """The ``webhook-id`` header: stable across retries, unique per event and endpoint."""
        return f"msg_{self.id.hex}"

    def to_json(self) -> dict[str, Any]:
        """The API view of a delivery (payload omitted)."""
        return {
            "id": str(self.id),
            "job_id": str(self.job_id),
            "event_id": self.event_id,
            "event_type": self.event_type,
            "url": self.url,
            "status": self.status,
            "attempt_count": self.attempt_count,
            "next_attempt_at": _iso(self.next_attempt_at) if self.status == PENDING else None,
            "last_status_code": self.last_status_code,
            "last_error": self.last_error,
            "created_at": _iso(self.created_at),
            "delivered_at": _iso(self.delivered_at),
            "message_id": self.message_id,
        }


@dataclass(frozen=True)
class WebhookAttempt:
    """A row of ``webhook_attempts``: one HTTP attempt of a delivery."""

    id: int
    delivery_id: UUID
    attempt: int
    trigger: str
    url: str
    status_code: int | None
    latency_ms: float | None
    error: str | None
    response_excerpt: str | None
    created_at: datetime

    def to_json(self) -> dict[str, Any]:
        """The API view of an attempt."""
        return {
            "attempt": self.attempt,
            "trigger": self.trigger,
            "url": self.url,
            "status_code": self.status_code,
            "latency_ms": self.latency_ms,
            "error": self.error,
            "response_excerpt": self.response_excerpt,
            "created_at": _iso(self.created_at),
        }


@dataclass(frozen=True)
class DeliveryHistory:
    """A delivery with its attempts, oldest first."""

    delivery: WebhookDelivery
    attempts: list[WebhookAttempt]

    def to_json(self) -> dict[str, Any]:
        return {**self.delivery.to_json(), "attempts": [a.to_json() for a in self.attempts]}


@dataclass(frozen=True)
class AttemptOutcome:
    """What one HTTP attempt produced, as logged."""

    url: str
    status_code: int | None = None
    latency_ms: float | None = None
    error: str | None = None
    response_excerpt: str | None = None


@dataclass(frozen=True)
class WebhookEndpoint:
    """A row of ``webhook_endpoints``: health and secrets of one (tenant, url)."""

    tenant: str
    url: str
    status: str
    consecutive_failures: int
    failing_since: datetime | None
    disabled_at: datetime | None
    disabled_reason: str | None
    secret: str | None
    previous_secret: str | None
    previous_secret_expires_at: datetime | None

    @property
    def disabled(self) -> bool:
        return self.status == "disabled"


@dataclass(frozen=True)
class EndpointSecrets:
    """An endpoint's own signing secrets, as read when its delivery was claimed."""

    secret: str | None
    previous_secret: str | None
    previous_secret_expires_at: datetime | None


@dataclass(frozen=True)
class ClaimedDelivery:
    """A delivery claimed for one attempt, with its endpoint's secrets (None: no row)."""

    delivery: WebhookDelivery
    secrets: EndpointSecrets | None
    body: bytes | None = None
    """The body to send when the caller already encoded it (``NewDelivery.body``)."""


@dataclass(frozen=True)
class Sweep:
    """What one claim found: the deliveries claimed or, when there were none, in how many
    seconds the earliest pending (or leased) delivery is due (None when idle)."""

    claimed: list[ClaimedDelivery]
    due_in: float | None = None


@dataclass(frozen=True)
class Settlement:
    """What settling an attempt did: whether it was recorded (the lease was still held)
    and, when it counted as a failure, the endpoint's health after it."""

    recorded: bool
    endpoint: WebhookEndpoint | None = None


@dataclass(frozen=True)
class EventJob:
    """The job a webhook event is about, with its progress updates and stage runs."""

    job: JobRecord
    updates: list[dict[str, Any]]
    runs: list[dict[str, Any]]

    def document(self, estimated_total: float) -> dict[str, Any]:
        """The job's status document, as polling returns it."""
        return status_document(self.job, self.updates, self.runs, estimated_total)


@dataclass(frozen=True)
class NewDelivery:
    """A delivery to store for an event."""

    job_id: UUID
    tenant: str
    event_id: str
    event_type: str
    url: str
    payload: dict[str, Any]
    occurred_at: datetime
    body: bytes | None = None
    """``payload`` encoded as it is sent (``notifier.payload.encode_body``), when the caller
    has it: stored as it is and sent on the first attempt without encoding it again."""


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None
