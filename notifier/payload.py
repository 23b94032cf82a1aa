"""The webhook body: ``{"type", "timestamp", "data"}``, kept well under 20 KB."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Final
from uuid import UUID

import orjson

from core import jsonbytes

MAX_PAYLOAD_BYTES: Final = 16 * 1024
_ERROR_LIMIT: Final = 2000


def job_url(public_base_url: str | None, job_id: UUID | str) -> str:
    """Where the full job status (with the result) can be fetched."""
    return f"{(public_base_url or '').rstrip('/')}/api/v1/blog/jobs/{job_id}"


def build_payload(
    event_type: str,
    occurred_at: datetime,
    document: dict[str, Any],
    *,
    public_base_url: str | None,
    limit: int = MAX_PAYLOAD_BYTES,
) -> tuple[dict[str, Any], bytes]:
    """The payload for a job event and its body (``encode_body`` of it); a result that
    would push it past ``limit`` bytes is replaced by ``result_url`` (and, if still too
    big, the progress history is dropped). A payload that fits is encoded once, for the
    size check, the store and the first attempt, and kept as UTF-8 bytes until it is sent
    (as a ``str`` it would take two bytes a character once one is outside Latin-1)."""
    data = dict(document)
    payload = {"type": event_type, "timestamp": iso_utc(occurred_at), "data": data}
    body = orjson.dumps(payload)  # already in encode_body's order
    if len(body) <= limit:
        return payload, jsonbytes.right_sized(body)
    data["result"] = None
    data["result_omitted"] = True
    data["result_url"] = job_url(public_base_url, data.get("job_id", ""))
    if _size(payload) <= limit:
        return payload, encode_body(payload)
    for key in ("progress_updates", "stages", "metadata"):
        data[key] = None
    if isinstance(data.get("error_message"), str):
        data["error_message"] = data["error_message"][:_ERROR_LIMIT]
    data["error"] = None if _size(payload) > limit else data.get("error")
    return payload, encode_body(payload)


def ping_payload(now: datetime | None = None) -> dict[str, Any]:
    """The ``ping`` test event an integrator can trigger."""
    return {
        "type": "ping",
        "timestamp": iso_utc(now or datetime.now(UTC)),
        "data": {"success": True},
    }


def encode_body(payload: dict[str, Any]) -> bytes:
    """The exact body that is signed and sent: type, timestamp, data first, compact JSON
    in UTF-8."""
    ordered: dict[str, Any] = {k: payload[k] for k in ("type", "timestamp", "data") if k in payload}
    ordered.update(payload)
    return jsonbytes.dumps(ordered)


def iso_utc(value: datetime) -> str:
    """ISO 8601 in UTC, ``Z``-suffixed; naive values are taken to be UTC."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _size(payload: dict[str, Any]) -> int:
    return len(orjson.dumps(payload))
