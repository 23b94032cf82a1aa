"""Kept JSON bytes cost their length, not orjson's working buffer."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from datetime import UTC, datetime
from uuid import uuid4

import orjson

from core import jsonbytes
from core.db.pipeline import StoredOutputs
from core.events import StageMessage
from notifier.payload import build_payload

DRAFT = {"markdown": "# Plants\n\n" + "Leaves turn to the light — slowly. " * 30, "word_count": 180}


def _held_per_object(make: Callable[[], bytes], count: int = 200) -> float:
    """Bytes allocated per object while ``count`` of them are kept."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = [make() for _ in range(count)]
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(kept) == count
    return held / count


def test_dumps_is_orjson_output_in_a_buffer_of_its_length() -> None:
    data = jsonbytes.dumps(DRAFT, option=orjson.OPT_NON_STR_KEYS)
    assert data == orjson.dumps(DRAFT, option=orjson.OPT_NON_STR_KEYS)
    assert _held_per_object(lambda: jsonbytes.dumps(DRAFT)) < len(data) + 100


def test_right_sized_copies_and_keeps_the_content() -> None:
    data = orjson.dumps(DRAFT)
    copy = jsonbytes.right_sized(data)
    assert copy == data and type(copy) is bytes
    assert _held_per_object(lambda: jsonbytes.right_sized(data)) < len(data) + 100


def test_a_claims_outputs_and_a_stage_message_are_kept_right_sized() -> None:
    outputs = StoredOutputs.parsed({"draft": DRAFT})
    (stored,) = outputs._raw.values()
    assert _held_per_object(lambda: StoredOutputs.parsed({"draft": DRAFT})._raw["draft"]) < (
        len(stored) + 200
    )
    job_id = uuid4()
    message = StageMessage(job_id, "draft", 1).to_message()
    assert StageMessage.from_bytes(message.data) == StageMessage(job_id, "draft", 1)
    # A 70-byte message, not a 4 KB buffer.
    assert _held_per_object(lambda: StageMessage(job_id, "draft", 1).to_message().data) < 400


def test_a_webhook_body_is_kept_as_utf8_bytes_of_its_length() -> None:
    document = {"job_id": "j1", "status": "completed", "result": DRAFT}
    at = datetime(2026, 1, 1, 12, tzinfo=UTC)
    _, body = build_payload("job.completed", at, document, public_base_url=None)
    assert type(body) is bytes and "\u2014".encode() in body
    held = _held_per_object(
        lambda: build_payload("job.completed", at, document, public_base_url=None)[1], count=50
    )
    # Not orjson's 2 KB-rounded buffer, nor a str of two bytes a character.
    assert held < len(body) + 200
