"""JSON bytes that are kept a while, in buffers of their own length.

orjson (3.12 and later) hands back its working buffer as the ``bytes`` object: at least
4 KB, grown in powers of two and never trimmed, while ``len`` and ``sys.getsizeof``
show only the length. A 1 KB stage output kept that way costs 8 KB, a 100-byte
message 4 KB. Bytes that are sent and dropped can stay as orjson made them; bytes that
wait — a claim's earlier outputs, a message until it is published, a webhook body
until it is sent, a cached poll body — are copied to their length here (about a
microsecond for 10 KB). In ``blogpipe dev`` with 2,000 jobs in flight, claims' output
buffers were 98 MB of a 231 MB peak (memray, high-water mark).
"""

from __future__ import annotations

from typing import Any

import orjson


def dumps(value: Any, *, option: int = 0) -> bytes:
    """``value`` as compact JSON (``orjson.dumps`` with ``option``), right-sized to keep."""
    return right_sized(orjson.dumps(value, option=option))


def right_sized(data: bytes) -> bytes:
    """``data`` copied into a buffer of its own length."""
    return bytes(memoryview(data))
