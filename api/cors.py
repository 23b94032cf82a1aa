"""CORS for browser frontends: only the origins in ``CORS_ALLOWED_ORIGINS``, none by default.

Keys travel in the ``Authorization`` header, never in cookies, so credentials mode stays
off; a preflight from an unlisted origin is answered 400 and grants nothing.
"""

from __future__ import annotations

from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware

from core.settings import Settings

ALLOWED_METHODS = ("GET", "POST", "OPTIONS")
ALLOWED_HEADERS = ("Authorization", "Content-Type", "Idempotency-Key")
EXPOSED_HEADERS = ("Retry-After", "Location")
PREFLIGHT_MAX_AGE = 600


def cors_middleware(settings: Settings) -> Middleware:
    """Starlette's CORSMiddleware configured from settings (outermost, so 401s carry CORS)."""
    return Middleware(
        CORSMiddleware,
        allow_origins=list(settings.cors_allowed_origins),
        allow_methods=list(ALLOWED_METHODS),
        allow_headers=list(ALLOWED_HEADERS),
        expose_headers=list(EXPOSED_HEADERS),
        allow_credentials=False,
        max_age=PREFLIGHT_MAX_AGE,
    )
