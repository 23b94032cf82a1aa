"""The retry schedule, jitter, Retry-After, what counts as success, and the payload limit."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import orjson
import pytest

from core.db.raw import EncodedJson, _from_jsonb, _json, _jsonb
from core.settings import DEFAULT_WEBHOOK_RETRY_SCHEDULE
from notifier.payload import (
    MAX_PAYLOAD_BYTES,
    build_payload,
    encode_body,
    iso_utc,
)
from notifier.retry import RetryPolicy, is_success, parse_retry_after


def policy(
    schedule: tuple[float, ...] = DEFAULT_WEBHOOK_RETRY_SCHEDULE, seed: int = 7
) -> RetryPolicy:
    return RetryPolicy(schedule, rng=random.Random(seed))


def test_default_schedule_is_the_documented_one() -> None:
    assert DEFAULT_WEBHOOK_RETRY_SCHEDULE == (0, 5, 300, 1800, 7200, 18000, 36000, 36000)


def test_each_retry_waits_its_slot_within_20_percent() -> None:
    retry = policy()
    for attempt in range(1, retry.max_attempts):
        base = DEFAULT_WEBHOOK_RETRY_SCHEDULE[attempt]
        for _ in range(200):
            delay = retry.delay_after(attempt)
            assert delay is not None
            assert base * 0.8 <= delay <= base * 1.2


def test_jitter_actually_varies() -> None:
    retry = policy()
    assert len({retry.delay_after(2) for _ in range(20)}) > 1


def test_schedule_is_exhausted_after_its_last_attempt() -> None:
    retry = policy((0.0, 0.2, 0.4))
    assert retry.max_attempts == 3
    assert retry.delay_after(2) is not None
    assert retry.delay_after(3) is None


def test_retry_after_lengthens_the_wait_and_is_clamped() -> None:
    retry = RetryPolicy((0.0, 1.0, 1.0), max_retry_after=60.0, rng=random.Random(1))
    assert retry.delay_after(1, retry_after=30.0) == 30.0
    assert retry.delay_after(1, retry_after=86400.0) == 60.0
    delay = retry.delay_after(1, retry_after=0.0)
    assert delay is not None and 0.8 <= delay <= 1.2


def test_parse_retry_after() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after(" 3 ") == 3.0
    assert parse_retry_after("-5") == 0.0
    assert (
        parse_retry_after(format_datetime(now + timedelta(seconds=90), usegmt=True), now=now)
        == 90.0
    )
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None


@pytest.mark.parametrize(
    ("code", "ok"),
    [
        (200, True),
        (204, True),
        (299, True),
        (301, False),
        (302, False),
        (410, False),
        (None, False),
    ],
)
def test_success_is_2xx_only(code: int | None, ok: bool) -> None:
    assert is_success(code) is ok


def test_small_payloads_are_inlined() -> None:
    document = {"job_id": "j1", "status": "completed", "result": {"content": "short"}}
    payload, _ = build_payload(
        "job.completed", datetime(2026, 1, 1, 12, tzinfo=UTC), document, public_base_url=None
    )
    assert payload == {
        "type": "job.completed",
        "timestamp": "2026-01-01T12:00:00Z",
        "data": document,
    }
    assert encode_body(payload).startswith(b'{"type":"job.completed","timestamp":')


def test_large_results_are_referenced_by_url() -> None:
    document = {
        "job_id": "j1",
        "status": "completed",
        "result": {"content": "x" * 50_000},
        "progress_updates": [{"details": "y" * 100}] * 10,
    }
    payload, _ = build_payload(
        "job.completed", datetime.now(UTC), document, public_base_url="https://api.example/"
    )
    assert payload["data"]["result"] is None
    assert payload["data"]["result_omitted"] is True
    assert payload["data"]["result_url"] == "https://api.example/api/v1/blog/jobs/j1"
    assert payload["data"]["progress_updates"] == document["progress_updates"]
    assert len(orjson.dumps(payload)) <= MAX_PAYLOAD_BYTES < 20 * 1024


def test_oversized_everything_still_fits() -> None:
    document = {
        "job_id": "j1",
        "result": {"content": "x" * 50_000},
        "progress_updates": [{"details": "y" * 1000}] * 40,
        "error_message": "e" * 30_000,
        "error": {"trace": "t" * 30_000},
    }
    payload, _ = build_payload("job.failed", datetime.now(UTC), document, public_base_url=None)
    assert len(orjson.dumps(payload)) <= MAX_PAYLOAD_BYTES
    assert payload["data"]["result_url"] == "/api/v1/blog/jobs/j1"


def test_iso_utc_converts() -> None:
    from datetime import timezone

    assert (
        iso_utc(datetime(2026, 1, 1, 14, tzinfo=timezone(timedelta(hours=2))))
        == "2026-01-01T12:00:00Z"
    )


@pytest.mark.parametrize("content", ["short", "x" * 50_000])
def test_the_body_is_the_payload_encoded_as_sent(content: str) -> None:
    document = {"job_id": "j1", "status": "completed", "result": {"content": content}}
    at = datetime(2026, 1, 1, 12, tzinfo=UTC)
    payload, body = build_payload("job.completed", at, document, public_base_url=None)
    assert body == encode_body(payload) and type(body) is bytes
    assert len(body) <= MAX_PAYLOAD_BYTES


def test_encoded_json_goes_to_the_database_as_it_is() -> None:
    assert _json(EncodedJson(b'{"a": [1, 2]}')) == b'{"a": [1, 2]}'
    assert _json('{"a": 1}') == b'"{\\"a\\": 1}"'  # a plain string is a JSON string
    assert _json({"a": 1}) == b'{"a":1}'
    assert _jsonb(EncodedJson(b'{"a": "\xe2\x80\x94"}')) == b'\x01{"a": "\xe2\x80\x94"}'
    assert _from_jsonb(b'\x01{"a": "\xe2\x80\x94"}') == {"a": "\u2014"}
    with pytest.raises(ValueError, match="jsonb format version"):
        _from_jsonb(b'\x02{"a": 1}')
