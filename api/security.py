"""The security middleware stack, outermost first: CORS, the 503 for an unreachable
database, request limits, API-key authentication, submission limits."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.middleware import Middleware

from api.auth import ApiKeyAuth, warn_if_open
from api.cors import cors_middleware
from api.limits import RequestLimits, SubmissionLimits
from api.unavailable import DatabaseUnavailable
from core.db.apikeys import ApiKeyRepository
from core.settings import Settings


def security_middleware(settings: Settings, engine: AsyncEngine) -> list[Middleware]:
    """What every request passes through before a route sees it."""
    warn_if_open(settings.auth)
    return [
        cors_middleware(settings),
        Middleware(DatabaseUnavailable),
        Middleware(
            RequestLimits,
            max_body_bytes=settings.max_body_bytes,
            max_header_bytes=settings.max_header_bytes,
            max_json_depth=settings.max_json_depth,
        ),
        Middleware(
            ApiKeyAuth,
            mode=settings.auth,
            keys=ApiKeyRepository(engine) if settings.auth == "apikey" else None,
        ),
        Middleware(
            SubmissionLimits,
            engine=engine,
            rate_per_second=settings.rate_limit_per_second,
            burst=settings.rate_limit_burst,
            max_in_flight=settings.max_in_flight,
        ),
    ]
