"""Pub/Sub push envelopes: parsing, and how the push route answers."""

from __future__ import annotations

import base64
import json
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from api.push import parse_push_envelope, push_route
from core.broker import Delivery, Nack


def envelope(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "message": {
            "data": base64.b64encode(b'{"job_id": "j1"}').decode(),
            "attributes": {"stage": "draft"},
            "messageId": "42",
            "publishTime": "2026-11-29T04:30:16.833Z",
        },
        "subscription": "projects/demo/subscriptions/blog-draft-worker",
        "deliveryAttempt": 3,
    }
    body.update(overrides)
    return body


def encode(body: Any) -> bytes:
    return json.dumps(body).encode()


def test_parses_a_full_envelope() -> None:
    assert parse_push_envelope(encode(envelope())) == Delivery(
        message_id="42",
        data=b'{"job_id": "j1"}',
        attributes={"stage": "draft"},
        delivery_attempt=3,
        subscription="blog-draft-worker",
    )


def test_accepts_snake_case_message_id_and_defaults() -> None:
    body = envelope(message={"message_id": "7"}, subscription="blog-seo-worker")
    del body["deliveryAttempt"]
    delivery = parse_push_envelope(encode(body))
    assert (delivery.message_id, delivery.data, delivery.attributes) == ("7", b"", {})
    assert delivery.delivery_attempt == 1
    assert delivery.subscription == "blog-seo-worker"


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"not json", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (encode([1, 2]), "JSON object"),
        (encode({"subscription": "projects/p/subscriptions/abc"}), "no 'message'"),
        (encode(envelope(message={"data": "aGk="})), "messageId"),
        (encode(envelope(message={"messageId": "1", "data": "***"})), "base64"),
        (encode(envelope(message={"messageId": "1", "data": 5})), "base64"),
        (encode(envelope(message={"messageId": "1", "attributes": {"a": 1}})), "attributes"),
        (encode(envelope(deliveryAttempt=0)), "deliveryAttempt"),
        (encode(envelope(deliveryAttempt="2")), "deliveryAttempt"),
        (encode(envelope(deliveryAttempt=True)), "deliveryAttempt"),
        (encode(envelope(subscription=None)), "no 'subscription'"),
        (encode(envelope(subscription="projects/p/topics/t")), "projects/P/subscriptions/NAME"),
    ],
)
def test_rejects_malformed_envelopes(body: bytes, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        parse_push_envelope(body)


class Recorder:
    def __init__(self, failure: BaseException | None = None) -> None:
        self.deliveries: list[Delivery] = []
        self.failure = failure

    async def __call__(self, delivery: Delivery) -> None:
        self.deliveries.append(delivery)
        if self.failure is not None:
            raise self.failure


async def post(app: Starlette, path: str, body: bytes) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://push.test") as client:
        return await client.post(path, content=body, timeout=10)


PATH = "/pubsub/push/blog-draft-worker"


async def test_route_acks_with_204_after_the_handler_returns() -> None:
    recorder = Recorder()
    app = Starlette(routes=[push_route({"blog-draft-worker": recorder})])
    response = await post(app, PATH, encode(envelope()))
    assert response.status_code == 204
    assert [d.message_id for d in recorder.deliveries] == ["42"]


@pytest.mark.parametrize(("failure", "status"), [(RuntimeError("boom"), 500), (Nack("later"), 503)])
async def test_route_nacks_when_the_handler_raises(failure: Exception, status: int) -> None:
    app = Starlette(routes=[push_route({"blog-draft-worker": Recorder(failure)})])
    response = await post(app, PATH, encode(envelope()))
    assert response.status_code == status
    assert "error" in response.json()


async def test_route_answers_400_with_the_reason_for_a_bad_envelope() -> None:
    recorder = Recorder()
    app = Starlette(routes=[push_route({"blog-draft-worker": recorder})])
    response = await post(app, PATH, b"{}")
    assert response.status_code == 400
    assert "message" in response.json()["error"]
    mismatched = encode(envelope(subscription="projects/demo/subscriptions/blog-seo-worker"))
    response = await post(app, PATH, mismatched)
    assert response.status_code == 400
    assert "blog-seo-worker" in response.json()["error"]
    assert recorder.deliveries == []


async def test_route_answers_404_for_an_unknown_subscription() -> None:
    app = Starlette(routes=[push_route({"blog-draft-worker": Recorder()})])
    response = await post(app, "/pubsub/push/blog-seo-worker", encode(envelope()))
    assert response.status_code == 404
    assert "blog-seo-worker" in response.json()["error"]


async def test_authorize_runs_first_and_can_reject() -> None:
    recorder = Recorder()

    async def authorize(request: Request) -> Response | None:
        if request.headers.get("authorization") == "Bearer ok":
            return None
        return JSONResponse({"error": "unauthorized"}, status_code=401)

    app = Starlette(routes=[push_route({"blog-draft-worker": recorder}, authorize)])
    assert (await post(app, PATH, b"garbage")).status_code == 401
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://push.test") as client:
        response = await client.post(
            PATH, content=encode(envelope()), headers={"authorization": "Bearer ok"}, timeout=10
        )
    assert response.status_code == 204
    assert len(recorder.deliveries) == 1
