"""Pub/Sub PUSH delivery: ``POST /pubsub/push/{subscription}`` runs a stage's handler.

Pub/Sub treats any 2xx answer as an ack and anything else as a nack, which it
retries with the subscription's retry policy until the dead-letter limit. So the
route answers 204 when the handler returns, 500 (503 for an explicit ``Nack``) when
it raises, 404 for a subscription it does not serve and 400 for a malformed
envelope. The push request must be answered within the subscription's ack deadline.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from core.broker import Delivery, Handler, Nack

logger = logging.getLogger(__name__)

PUSH_ROUTE_PATH = "/pubsub/push/{subscription}"

Authorize = Callable[[Request], Awaitable[Response | None]]
"""Returns a Response to reject the request, or None to let it through."""


def parse_push_envelope(body: bytes) -> Delivery:
    """Turn a push request body into a Delivery; raise ValueError saying what is wrong.

    ``subscription`` is the short name (``projects/p/subscriptions/NAME`` → ``NAME``);
    ``deliveryAttempt`` is absent without a dead-letter policy, and then counts as 1.
    """
    try:
        envelope = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"push body is not JSON: {exc}") from None
    if not isinstance(envelope, dict):
        raise ValueError("push body must be a JSON object with a 'message'")
    message = envelope.get("message")
    if not isinstance(message, dict):
        raise ValueError("push envelope has no 'message' object")

    message_id = message.get("messageId", message.get("message_id"))
    if not isinstance(message_id, str) or not message_id:
        raise ValueError("push message has no 'messageId'")

    return Delivery(
        message_id=message_id,
        data=_data(message.get("data")),
        attributes=_attributes(message.get("attributes")),
        delivery_attempt=_delivery_attempt(envelope.get("deliveryAttempt")),
        subscription=_subscription(envelope.get("subscription")),
    )


def _data(raw: Any) -> bytes:
    # A message may carry attributes only; Pub/Sub then omits 'data'.
    if raw is None:
        return b""
    if not isinstance(raw, str):
        raise ValueError("push message 'data' must be a base64 string")
    try:
        return base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("push message 'data' is not valid base64") from None


def _attributes(raw: Any) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not all(
        isinstance(key, str) and isinstance(value, str) for key, value in raw.items()
    ):
        raise ValueError("push message 'attributes' must map strings to strings")
    return dict(raw)


def _delivery_attempt(raw: Any) -> int:
    if raw is None:
        return 1
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 1:
        raise ValueError("push envelope 'deliveryAttempt' must be a positive integer")
    return raw


def _subscription(raw: Any) -> str:
    if not isinstance(raw, str) or not raw:
        raise ValueError("push envelope has no 'subscription'")
    parts = raw.split("/")
    if len(parts) == 1:
        return raw
    if len(parts) == 4 and parts[0] == "projects" and parts[2] == "subscriptions" and parts[3]:
        return parts[3]
    raise ValueError(
        f"push envelope 'subscription' must look like projects/P/subscriptions/NAME, got {raw!r}"
    )


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def push_route(handlers: Mapping[str, Handler], authorize: Authorize | None = None) -> Route:
    """The route serving push subscriptions; ``handlers`` maps short subscription names."""

    async def receive_push(request: Request) -> Response:
        if authorize is not None:
            rejection = await authorize(request)
            if rejection is not None:
                return rejection
        name = request.path_params["subscription"]
        handler = handlers.get(name)
        if handler is None:
            return _error(404, f"no handler for subscription {name!r}")
        try:
            delivery = parse_push_envelope(await request.body())
        except ValueError as exc:
            return _error(400, str(exc))
        if delivery.subscription != name:
            return _error(
                400,
                f"envelope is for subscription {delivery.subscription!r} "
                f"but was pushed to {name!r}",
            )
        extra = {
            "subscription": name,
            "message_id": delivery.message_id,
            "delivery_attempt": delivery.delivery_attempt,
        }
        try:
            await handler(delivery)
        except Nack as exc:
            logger.info(
                "Handler nacked pushed message %s on %s (attempt %d): %s",
                delivery.message_id,
                name,
                delivery.delivery_attempt,
                exc,
                extra={**extra, "action": "message_nacked"},
            )
            return _error(503, f"nacked: {exc}" if str(exc) else "nacked")
        except Exception:
            logger.exception(
                "Handler failed on pushed message %s on %s (attempt %d)",
                delivery.message_id,
                name,
                delivery.delivery_attempt,
                extra={**extra, "action": "handler_failed"},
            )
            return _error(500, "handler failed; the message will be redelivered")
        return Response(status_code=204)

    return Route(PUSH_ROUTE_PATH, receive_push, methods=["POST"], name="pubsub_push")
