"""Webhook inspection and operator routes: deliveries of a job, redeliver, recover, ping."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from uuid import UUID

import orjson
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from api.auth import actor_of, tenant_of
from api.caller_auth import Authorizer, Endpoint, guarded
from api.responses import JSONResponse, detail
from core.db import audit
from core.db.jobs import JobRepository
from core.settings import Settings
from core.ssrf import AsyncResolver
from notifier.http1 import Http1Client
from notifier.operations import DEFAULT_RECOVER_CAP, WebhookOperations, parse_since

MAX_RECOVER_CAP = 10_000


class _Invalid(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def webhook_routes(
    engine: AsyncEngine,
    settings: Settings,
    *,
    http_client: Http1Client | None = None,
    allowed_hosts: Sequence[str] | None = None,
    allow_http: bool | None = None,
    resolver: AsyncResolver | None = None,
    authorize: Authorizer | None = None,
) -> list[Route]:
    """The webhook routes; ``authorize`` (if given) guards the operator actions."""
    ops = WebhookOperations(
        engine,
        settings,
        http_client=http_client,
        allowed_hosts=allowed_hosts,
        allow_http=allow_http,
        resolver=resolver,
    )
    jobs = JobRepository(engine)

    async def list_deliveries(request: Request) -> Response:
        """GET /api/v1/blog/jobs/{job_id}/deliveries — deliveries with their attempts."""
        job_id = _uuid(request.path_params["job_id"])
        if job_id is None or await jobs.get(job_id, tenant=tenant_of(request)) is None:
            return detail(404, f"Job {request.path_params['job_id']} not found")
        histories = await ops.deliveries_for_job(job_id)
        return JSONResponse(
            {"job_id": str(job_id), "deliveries": [history.to_json() for history in histories]}
        )

    async def redeliver(request: Request) -> Response:
        """POST /api/v1/webhooks/deliveries/{delivery_id}/redeliver — one more attempt, now."""
        delivery_id = _uuid(request.path_params["delivery_id"])
        found = await ops.deliveries.get(delivery_id) if delivery_id else None
        tenant = tenant_of(request)
        if delivery_id is None or found is None or tenant not in (None, found.tenant):
            return detail(404, f"Delivery {request.path_params['delivery_id']} not found")
        delivery = await ops.redeliver(delivery_id)
        if delivery is None:
            return detail(409, "An attempt of this delivery is in flight; try again shortly")
        await audit.record(
            engine,
            actor_of(request),
            "webhook.redeliver",
            str(delivery_id),
            {"job_id": str(found.job_id), "event_type": found.event_type},
        )
        return JSONResponse({"delivery": delivery.to_json(), "queued": True}, status_code=202)

    async def recover(request: Request) -> Response:
        """POST /api/v1/webhooks/deliveries/recover — re-queue failed deliveries since a time.

        Parameters (JSON body or query): ``since`` (``6h``, ``2d`` or ISO 8601; default
        ``24h``), ``cap`` (default 1000), ``dry_run`` (count and preview only), ``tenant``.
        """
        try:
            params = await _params(request)
            since = parse_since(str(params.get("since") or "24h"))
            cap = _int(params.get("cap", DEFAULT_RECOVER_CAP), "cap", 1, MAX_RECOVER_CAP)
            dry_run = _bool(params.get("dry_run", False), "dry_run")
            tenant = tenant_of(request) or params.get("tenant")
        except (_Invalid, ValueError) as exc:
            return detail(422, str(exc))
        result = await ops.recover_failed(
            since=since, cap=cap, dry_run=dry_run, tenant=str(tenant) if tenant else None
        )
        if not dry_run:
            await audit.record(
                engine,
                actor_of(request),
                "webhook.recover",
                f"since:{since}",
                {"cap": cap, "tenant": tenant, "queued": result.to_json()["queued"]},
            )
        return JSONResponse(result.to_json(), status_code=200 if dry_run else 202)

    async def ping(request: Request) -> Response:
        """POST /api/v1/webhooks/ping — send a signed ``ping`` event to ``url`` and report."""
        try:
            url = (await _params(request)).get("url")
        except _Invalid as exc:
            return detail(422, exc.message)
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            return detail(422, "url must be an http(s) URL")
        result = await ops.ping(url, tenant=tenant_of(request) or "default")
        if result.blocked:
            return detail(422, result.error or "url refused")
        return JSONResponse(
            {
                "url": url,
                "delivered": result.ok,
                "status_code": result.status_code,
                "latency_ms": result.latency_ms,
                "error": result.outcome().error,
                "response_excerpt": result.response_excerpt,
            }
        )

    async def enable_endpoint(request: Request) -> Response:
        """POST /api/v1/webhooks/endpoints/enable — re-enable an endpoint, resume held ones."""
        try:
            params = await _params(request)
            url = params.get("url")
            recover_held = _bool(params.get("recover", True), "recover")
        except _Invalid as exc:
            return detail(422, exc.message)
        if not isinstance(url, str) or not url:
            return detail(422, "url is required")
        tenant = tenant_of(request) or str(params.get("tenant") or "default")
        resumed = await ops.enable_endpoint(url, tenant=tenant, recover=recover_held)
        await audit.record(
            engine,
            actor_of(request),
            "webhook.endpoint_enabled",
            url,
            {"tenant": tenant, "resumed": resumed},
        )
        return JSONResponse({"url": url, "tenant": tenant, "enabled": True, "resumed": resumed})

    def admin(endpoint: Endpoint) -> Endpoint:
        return guarded(authorize, endpoint) if authorize else endpoint

    return [
        Route("/api/v1/blog/jobs/{job_id}/deliveries", list_deliveries, methods=["GET"]),
        Route("/api/v1/webhooks/deliveries/recover", admin(recover), methods=["POST"]),
        Route(
            "/api/v1/webhooks/deliveries/{delivery_id}/redeliver",
            admin(redeliver),
            methods=["POST"],
        ),
        Route("/api/v1/webhooks/ping", admin(ping), methods=["POST"]),
        Route("/api/v1/webhooks/endpoints/enable", admin(enable_endpoint), methods=["POST"]),
    ]


def _uuid(raw: str) -> UUID | None:
    try:
        return UUID(raw)
    except ValueError:
        return None


async def _params(request: Request) -> dict[str, Any]:
    """Query parameters overlaid by a JSON object body, if there is one."""
    params: dict[str, Any] = dict(request.query_params)
    body = await request.body()
    if body.strip():
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise _Invalid("the body must be a JSON object") from None
        if not isinstance(data, dict):
            raise _Invalid("the body must be a JSON object")
        params.update(data)
    return params


def _int(value: Any, name: str, minimum: int, maximum: int) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise _Invalid(f"{name} must be an integer") from None
    if not minimum <= number <= maximum:
        raise _Invalid(f"{name} must be between {minimum} and {maximum}")
    return number


def _bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off", ""):
        return False
    raise _Invalid(f"{name} must be a boolean")


def openapi_paths() -> dict[str, Any]:
    """OpenAPI entries for the webhook routes."""

    def answer(text: str) -> dict[str, Any]:
        return {
            "description": text,
            "content": {"application/json": {"schema": {"type": "object"}}},
        }

    def body(properties: dict[str, Any]) -> dict[str, Any]:
        schema = {"type": "object", "properties": properties}
        return {"required": False, "content": {"application/json": {"schema": schema}}}

    def path_id(name: str) -> dict[str, Any]:
        return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}

    invalid = answer("Invalid request; the message names the field")
    return {
        "/api/v1/blog/jobs/{job_id}/deliveries": {
            "get": {
                "summary": "A job's webhook deliveries with every attempt",
                "parameters": [path_id("job_id")],
                "responses": {"200": answer("Deliveries"), "404": answer("Job not found")},
            }
        },
        "/api/v1/webhooks/deliveries/{delivery_id}/redeliver": {
            "post": {
                "summary": "Send a delivery once more, now",
                "parameters": [path_id("delivery_id")],
                "responses": {
                    "202": answer("Queued"),
                    "404": answer("Delivery not found"),
                    "409": answer("An attempt is in flight"),
                },
            }
        },
        "/api/v1/webhooks/deliveries/recover": {
            "post": {
                "summary": "Re-queue failed deliveries since a time (dry_run previews; capped)",
                "requestBody": body(
                    {
                        "since": {"type": "string", "description": "6h, 2d or ISO 8601"},
                        "cap": {"type": "integer", "minimum": 1, "maximum": MAX_RECOVER_CAP},
                        "dry_run": {"type": "boolean"},
                    }
                ),
                "responses": {
                    "200": answer("Dry run: the count"),
                    "202": answer("Re-queued"),
                    "422": invalid,
                },
            }
        },
        "/api/v1/webhooks/ping": {
            "post": {
                "summary": "Send a signed ping event to a URL (through the SSRF guard)",
                "requestBody": body({"url": {"type": "string", "format": "uri"}}),
                "responses": {"200": answer("What the URL answered"), "422": invalid},
            }
        },
        "/api/v1/webhooks/endpoints/enable": {
            "post": {
                "summary": "Re-enable a disabled endpoint and resume its held deliveries",
                "requestBody": body({"url": {"type": "string"}, "recover": {"type": "boolean"}}),
                "responses": {"200": answer("Enabled"), "422": invalid},
            }
        },
    }
