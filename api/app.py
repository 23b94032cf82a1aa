"""Build the Starlette application from its dependencies."""

from __future__ import annotations

import logging
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response

from api import blog, health
from api.deps import ApiDeps
from api.openapi import openapi_document
from api.responses import detail
from api.security import security_middleware

logger = logging.getLogger("blogpipe.api")


async def _not_found(request: Request, exc: Exception) -> Response:
    return detail(404, f"No route for {request.url.path}")


async def _method_not_allowed(request: Request, exc: Exception) -> Response:
    return detail(405, f"Method {request.method} not allowed on {request.url.path}")


async def _server_error(request: Request, exc: Exception) -> Response:
    logger.exception(
        "Unhandled error on %s %s", request.method, request.url.path, extra={"action": "http_500"}
    )
    return detail(500, "Internal server error")


def create_app(deps: ApiDeps, *, extra_openapi: dict[str, Any] | None = None) -> Starlette:
    """The API app; ``deps.extra_routes`` adds push and webhook routes when wired."""
    app = Starlette(
        routes=[*blog.routes, *health.routes, *deps.extra_routes],
        exception_handlers={404: _not_found, 405: _method_not_allowed, 500: _server_error},
        middleware=security_middleware(deps.settings, deps.engine),
    )
    app.state.deps = deps
    app.state.openapi = openapi_document(extra_openapi)
    return app
