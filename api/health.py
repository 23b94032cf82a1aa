"""Liveness, readiness (the database answers), and the OpenAPI document."""

from __future__ import annotations

import asyncio

from sqlalchemy import text
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from api.responses import JSONResponse


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    engine = request.app.state.deps.engine
    try:
        async with asyncio.timeout(3):
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
    except Exception as exc:
        return JSONResponse(
            {"status": "unavailable", "checks": {"database": str(exc)[:200]}}, status_code=503
        )
    return JSONResponse({"status": "ok", "checks": {"database": "ok"}})


async def openapi(request: Request) -> Response:
    return JSONResponse(request.app.state.openapi)


routes = [
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/openapi.json", openapi, methods=["GET"]),
]
