"""An OpenAI-compatible fake server on a free loopback port (Starlette + uvicorn).

It speaks ``POST /v1/chat/completions``, plain and streamed (SSE chunks, then a usage
chunk when ``stream_options.include_usage`` is set). Structured answers are built from
the JSON schema of the request (``response_format.json_schema`` or a
``<json_schema>…</json_schema>`` block in the system prompt), or taken from
``fake.canned[stage]``. The stage is read from the ``blogpipe stage: <name>`` marker
of the system prompt, and calls are counted per stage.

Faults are scripted and consumed in order by matching requests::

    fake.fail("rate_limit", stage="research", times=2)   # 429 with retry-after-ms
    fake.fail("server_error")                            # 500
    fake.fail("slow", delay=5)                           # answer after 5 s
    fake.fail("length") / fake.fail("invalid_json") / fake.fail("refusal")
    fake.fail("content_filter") / fake.fail("status", status=401)
    fake.fail("drop")                                    # stream cut off mid-answer
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.support.server import LoopbackServer, running

FaultKind = Literal[
    "rate_limit",
    "server_error",
    "slow",
    "length",
    "invalid_json",
    "refusal",
    "content_filter",
    "status",
    "drop",
]
_STAGE = re.compile(r"blogpipe stage: (\w+)")
_SCHEMA_BLOCK = re.compile(r"<json_schema>\s*(.*?)\s*</json_schema>", re.DOTALL)
REFUSAL = "I'm sorry, but I can't help with that request."


@dataclass
class Fault:
    """A scripted failure for the next ``times`` matching requests."""

    kind: FaultKind
    stage: str | None = None
    times: int = 1
    status: int = 400
    retry_after_ms: int = 5
    delay: float = 5.0


def instance_from_schema(schema: dict[str, Any], root: dict[str, Any], name: str = "value") -> Any:
    """A value valid for a JSON schema (objects, arrays, enums, refs, anyOf, primitives)."""
    if "$ref" in schema:
        target: Any = root
        for part in schema["$ref"].lstrip("#/").split("/"):
            target = target[part]
        return instance_from_schema(target, root, name)
    if "enum" in schema:
        return schema["enum"][0]
    if "const" in schema:
        return schema["const"]
    for key in ("anyOf", "oneOf"):
        if key in schema:
            options = [o for o in schema[key] if o.get("type") != "null"] or schema[key]
            return instance_from_schema(options[0], root, name)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or "properties" in schema:
        return {
            key: instance_from_schema(sub, root, key)
            for key, sub in schema.get("properties", {}).items()
        }
    if kind == "array":
        item_name = name[:-1] if name.endswith("s") else name
        return [
            _numbered(instance_from_schema(schema.get("items", {}), root, item_name), index)
            for index in range(1, 4)
        ]
    if kind == "integer":
        return 150
    if kind == "number":
        return 1.5
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    if name == "url":
        return "https://example.org/reference"
    return f"Sample {name.replace('_', ' ')}"


def _numbered(value: Any, index: int) -> Any:
    """Make array items distinct (unique headings, URLs, questions)."""
    if isinstance(value, str):
        return f"{value} {index}" if not value.startswith("http") else f"{value}-{index}"
    if isinstance(value, dict):
        return {key: _numbered(item, index) for key, item in value.items()}
    return value


def sample_article(words: int = 700) -> str:
    """A Markdown article of about ``words`` words citing sources [1]-[3], with a FAQ."""
    sentences = [
        "Sample keyword planning starts with a clear goal for the reader.",
        "Short sentences keep the ideas easy to follow.",
        "Each step builds on the one before it.",
        "Good examples make abstract advice concrete.",
        "Measure the results and adjust the plan each week.",
        "Readers value honest comparisons over hype.",
        "A simple checklist prevents the most common mistakes.",
    ]
    lines = ["# Sample Title", ""]
    count, index, section = 0, 0, 0
    while count < words:
        if index % 12 == 0:
            section += 1
            lines += [f"## Section {section}", ""]
        paragraph = " ".join(
            f"{sentences[(index + k) % len(sentences)][:-1]} in part {index + k}." for k in range(4)
        )
        if index // 4 < 3:
            paragraph += f" Research supports this [{index // 4 + 1}]."
        lines += [paragraph, ""]
        count += len(paragraph.split())
        index += 4
    lines += ["## Frequently Asked Questions", "", "### What is this?", "", "A sample answer.", ""]
    return "\n".join(lines)


class FakeOpenAI:
    """The fake server: start it, point ``base_url`` at it, script faults, read counts."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = 0
        self.calls: Counter[str] = Counter()
        self.requests: list[dict[str, Any]] = []
        self.canned: dict[str, Any] = {}
        self.faults: list[Fault] = []
        self.article_words = 700
        self.article_lengths: list[int] = []
        """Word counts of the next articles, one per text answer (then ``article_words``)."""
        self.cached_tokens = 0
        self.reasoning_tokens = 0
        self.usages: list[dict[str, Any]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._closing = asyncio.Event()
        self._http: LoopbackServer | None = None
        self.app = Starlette(routes=[Route("/v1/chat/completions", self._handle, methods=["POST"])])

    @property
    def base_url(self) -> str:
        """What ``AsyncOpenAI(base_url=...)`` wants."""
        return f"http://{self.host}:{self.port}/v1"

    def fail(
        self, kind: FaultKind, *, stage: str | None = None, times: int = 1, **options: Any
    ) -> None:
        """Script a fault for the next ``times`` requests (of ``stage``, if given)."""
        self.faults.append(Fault(kind, stage, times, **options))

    def _take_fault(self, stage: str) -> Fault | None:
        for fault in self.faults:
            if fault.times > 0 and fault.stage in (None, stage):
                fault.times -= 1
                return fault
        return None

    async def _handle(self, request: Request) -> Response:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self._respond(await request.json())
        finally:
            self.in_flight -= 1

    async def _respond(self, body: dict[str, Any]) -> Response:
        self.requests.append(body)
        system = next((m["content"] for m in body["messages"] if m["role"] == "system"), "")
        match = _STAGE.search(system)
        stage = match.group(1) if match else "unknown"
        self.calls[stage] += 1
        fault = self._take_fault(stage)
        if fault is not None:
            early = await self._early_fault(fault)
            if early is not None:
                return early
        content, refusal, finish = self._answer(body, stage, system, fault)
        usage = self._usage(body, content or refusal or "")
        self.usages.append(usage)
        if body.get("stream"):
            chunks = self._chunks(body, content, refusal, finish, usage)
            if fault is not None and fault.kind == "drop":
                chunks = _dropped(chunks)
            return StreamingResponse(chunks, media_type="text/event-stream")
        return JSONResponse(
            {
                "id": "chatcmpl-fake",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model", "fake"),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": content, "refusal": refusal},
                        "finish_reason": finish,
                        "logprobs": None,
                    }
                ],
                "usage": usage,
            }
        )

    async def _early_fault(self, fault: Fault) -> Response | None:
        """Faults answered instead of a completion (or before it, for ``slow``)."""
        if fault.kind == "slow":
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), fault.delay)
            return None
        statuses = {"rate_limit": 429, "server_error": 500, "status": fault.status}
        if fault.kind not in statuses:
            return None
        status = statuses[fault.kind]
        error = {"message": f"fake {fault.kind}", "type": fault.kind, "code": str(status)}
        headers = {"retry-after-ms": str(fault.retry_after_ms)}
        return JSONResponse({"error": error}, status_code=status, headers=headers)

    def _answer(
        self, body: dict[str, Any], stage: str, system: str, fault: Fault | None
    ) -> tuple[str | None, str | None, str]:
        """Content, refusal and finish reason."""
        kind = fault.kind if fault else None
        if kind == "refusal":
            return None, REFUSAL, "stop"
        format_spec = body.get("response_format") or {}
        schema = (format_spec.get("json_schema") or {}).get("schema")
        if schema is None and (block := _SCHEMA_BLOCK.search(system)):
            schema = json.loads(block.group(1))
        if kind == "invalid_json":
            content = json.dumps({"unexpected": "shape"})
        elif stage in self.canned:
            canned = self.canned[stage]
            content = canned if isinstance(canned, str) else json.dumps(canned)
        elif schema is not None:
            content = json.dumps(instance_from_schema(schema, schema))
        else:
            words = self.article_lengths.pop(0) if self.article_lengths else self.article_words
            content = sample_article(words)
        if kind == "length":
            return content[: len(content) // 2], None, "length"
        if kind == "content_filter":
            return None, None, "content_filter"
        return content, None, "stop"

    def _usage(self, body: dict[str, Any], completion: str) -> dict[str, Any]:
        prompt = sum(len(str(m.get("content") or "")) for m in body["messages"]) // 4 + 1
        return {
            "prompt_tokens": prompt,
            "completion_tokens": len(completion) // 4 + 1,
            "total_tokens": prompt + len(completion) // 4 + 1,
            "prompt_tokens_details": {"cached_tokens": min(self.cached_tokens, prompt)},
            "completion_tokens_details": {"reasoning_tokens": self.reasoning_tokens},
        }

    async def _chunks(
        self,
        body: dict[str, Any],
        content: str | None,
        refusal: str | None,
        finish: str,
        usage: dict[str, Any],
    ) -> AsyncIterator[bytes]:
        base = {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": body.get("model", "fake"),
        }

        def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
            return f"data: {json.dumps({**base, 'choices': choices, **extra})}\n\n".encode()

        yield event(
            [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]
        )
        for piece in _pieces(content or "", 24):
            yield event([{"index": 0, "delta": {"content": piece}, "finish_reason": None}])
        if refusal:
            yield event([{"index": 0, "delta": {"refusal": refusal}, "finish_reason": None}])
        yield event([{"index": 0, "delta": {}, "finish_reason": finish}])
        if (body.get("stream_options") or {}).get("include_usage"):
            yield event([], usage=usage)
        yield b"data: [DONE]\n\n"

    async def start(self) -> None:
        """Listen on a free loopback port."""
        self._closing = asyncio.Event()
        if self._http is None:
            self._http = LoopbackServer(
                self.app, name="fake OpenAI server", host=self.host, port=self.port
            )
        self.port = await self._http.start()

    async def stop(self) -> None:
        """Stop the server (releasing slow answers first)."""
        self._closing.set()
        if self._http is not None:
            await self._http.stop()


class StreamDropped(Exception):
    """Raised inside a streamed answer so the server cuts the connection."""


async def _dropped(chunks: AsyncIterator[bytes], keep: int = 3) -> AsyncIterator[bytes]:
    """The first ``keep`` chunks, then a broken connection."""
    sent = 0
    async for chunk in chunks:
        if sent == keep:
            raise StreamDropped("fake connection drop")
        sent += 1
        yield chunk


def _pieces(text: str, parts: int) -> Iterator[str]:
    size = max(1, len(text) // parts + 1)
    for start in range(0, len(text), size):
        yield text[start : start + size]


def running_fake_openai() -> contextlib.AbstractAsyncContextManager[FakeOpenAI]:
    """A started fake server, stopped on exit."""
    return running(FakeOpenAI())


@pytest.fixture
async def fake_openai() -> AsyncIterator[FakeOpenAI]:
    """A running fake OpenAI server; ``.base_url``, ``.fail(...)``, ``.calls``, ``.canned``."""
    async with running_fake_openai() as fake:
        yield fake
