"""A first webhook attempt keeps the body encoded for it, not the payload dict as well."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from core.db.webhooks import ClaimedDelivery, WebhookDelivery
from notifier.service import _sending_body_only

NOW = datetime(2026, 12, 3, tzinfo=UTC)


def delivery(payload: dict[str, object]) -> WebhookDelivery:
    return WebhookDelivery(
        id=uuid.uuid4(),
        job_id=uuid.uuid4(),
        tenant="default",
        event_id="e-1",
        event_type="job.completed",
        url="https://hooks.example/in",
        payload=payload,
        status="sending",
        attempt_count=1,
        next_attempt_at=None,
        last_status_code=None,
        last_error=None,
        created_at=NOW,
        updated_at=NOW,
        delivered_at=None,
        occurred_at=NOW,
        trigger="event",
    )


def test_an_attempt_with_its_body_drops_the_payload_and_keeps_the_rest() -> None:
    payload = {"type": "job.completed", "data": {"result": {"content": "# Long article"}}}
    claimed = ClaimedDelivery(delivery(payload), None, '{"type":"job.completed"}')
    sent = _sending_body_only(claimed)
    assert sent.body == claimed.body and sent.secrets is claimed.secrets
    assert sent.delivery.payload == {}
    assert sent.delivery.message_id == claimed.delivery.message_id
    assert {**vars(sent.delivery), "payload": payload} == vars(claimed.delivery)
    assert claimed.delivery.payload is payload  # the stored delivery is left as it was


def test_an_attempt_without_a_body_keeps_its_payload_to_encode() -> None:
    claimed = ClaimedDelivery(delivery({"n": 1}), None, None)
    assert _sending_body_only(claimed) is claimed
