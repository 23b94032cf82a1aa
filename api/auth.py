"""Who may call the public API: ``Authorization: Bearer <API key>``, each key bound to a
tenant and scopes.

The middleware puts the caller on ``request.state``: ``principal`` (a Principal),
``tenant`` (every handler filters by it), ``key_id`` and ``actor`` (for audit records).
Scopes are decided here, from
the method and path, so a new route is covered the day it is added: reads under
``/api/v1/blog/`` need ``jobs:read``, submissions ``jobs:write``, and anything else under
``/api/`` (cancel, replay, redelivery, bulk actions) ``operator``.

The worker endpoint and Pub/Sub push endpoints authenticate their Google callers
themselves (``api.caller_auth``); health, readiness and the OpenAPI document are public.

With ``BLOGPIPE_AUTH=none`` every caller is the single tenant ``default`` with every
scope; that mode must be chosen explicitly and is logged loudly at start-up.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from api.responses import detail
from core.db import audit
from core.db.apikeys import (
    SCOPE_JOBS_READ,
    SCOPE_JOBS_WRITE,
    SCOPE_OPERATOR,
    SCOPES,
    ApiKeyRepository,
)
from core.settings import AuthMode

logger = logging.getLogger("blogpipe.api.auth")

DEFAULT_TENANT = "default"
UNAUTHORIZED_MESSAGE = "Missing or invalid API key; send 'Authorization: Bearer <key>'"

# Routes under /api/ that authenticate their callers themselves (Google OIDC or secret).
SELF_AUTHENTICATED = frozenset({"/api/v1/blog/worker"})

# (method, path pattern, scope), first match wins; unmatched /api/ routes need "operator".
SCOPE_RULES: list[tuple[frozenset[str], re.Pattern[str], str]] = [
    (frozenset({"POST"}), re.compile(r"^/api/v1/blog/generate-enhanced/?$"), SCOPE_JOBS_WRITE),
    (frozenset({"POST"}), re.compile(r"^/api/v1/blog/(jobs/)?batch/?$"), SCOPE_JOBS_WRITE),
    (frozenset({"GET", "HEAD"}), re.compile(r"^/api/v1/blog/"), SCOPE_JOBS_READ),
]


@dataclass(frozen=True)
class Principal:
    """The authenticated caller of one request."""

    tenant: str
    scopes: frozenset[str]
    key_id: str | None = None

    @property
    def actor(self) -> audit.Actor:
        """Who this is, for the audit log."""
        if self.key_id is None:
            return audit.Actor.anonymous(self.tenant)
        return audit.Actor.api_key(self.key_id, self.tenant)


ANONYMOUS = Principal(tenant=DEFAULT_TENANT, scopes=frozenset(SCOPES))


def required_scope(method: str, path: str) -> str | None:
    """The scope a request needs, or None when API keys do not apply to it."""
    if not path.startswith("/api/") or path in SELF_AUTHENTICATED:
        return None
    for methods, pattern, scope in SCOPE_RULES:
        if method in methods and pattern.match(path):
            return scope
    return SCOPE_OPERATOR


def principal_of(request: Request) -> Principal | None:
    """The caller the middleware authenticated, if it ran for this request."""
    principal = request.scope.get("state", {}).get("principal")
    return principal if isinstance(principal, Principal) else None


def tenant_of(request: Request) -> str | None:
    """The caller's tenant; None only where no API authentication applies."""
    principal = principal_of(request)
    return principal.tenant if principal else None


def actor_of(request: Request) -> audit.Actor:
    """Who is calling, for the audit log."""
    principal = principal_of(request)
    return principal.actor if principal else audit.Actor.anonymous()


class ApiKeyAuth:
    """ASGI middleware: authenticate the caller and check the route's scope."""

    def __init__(self, app: ASGIApp, *, mode: AuthMode, keys: ApiKeyRepository | None) -> None:
        if mode == "apikey" and keys is None:
            raise ValueError("API key authentication needs a key repository")
        self.app = app
        self.mode = mode
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        needed = required_scope(method, path)
        if needed is None:
            await self.app(scope, receive, send)
            return
        principal = ANONYMOUS if self.mode == "none" else await self._authenticate(scope)
        if principal is None:
            logger.info(
                "Rejected %s %s: missing or invalid API key",
                method,
                path,
                extra={"action": "api_key_rejected", "path": path},
            )
            response = detail(401, UNAUTHORIZED_MESSAGE)
            response.headers["WWW-Authenticate"] = 'Bearer realm="blogpipe"'
            await response(scope, receive, send)
            return
        if needed not in principal.scopes:
            logger.info(
                "Refused %s %s to key %s: needs scope %s",
                method,
                path,
                principal.key_id,
                needed,
                extra={
                    "action": "api_scope_refused",
                    "path": path,
                    "key_id": principal.key_id,
                    "scope": needed,
                },
            )
            response = detail(
                403,
                f"This API key lacks the '{needed}' scope this request needs",
                required_scope=needed,
            )
            response.headers["WWW-Authenticate"] = (
                f'Bearer realm="blogpipe", error="insufficient_scope", scope="{needed}"'
            )
            await response(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        state["principal"] = principal
        state["tenant"] = principal.tenant
        state["key_id"] = principal.key_id
        if principal.key_id is not None:
            state["actor"] = principal.actor.name  # "api-key:<id>" in operation records
        await self.app(scope, receive, send)

    async def _authenticate(self, scope: Scope) -> Principal | None:
        values = [value for name, value in scope["headers"] if name == b"authorization"]
        if len(values) != 1:
            return None
        try:
            header = values[0].decode("ascii")
        except UnicodeDecodeError:
            return None
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return None
        assert self.keys is not None
        key = await self.keys.authenticate(token)
        if key is None:
            return None
        return Principal(tenant=key.tenant, scopes=frozenset(key.scopes), key_id=key.id)


def warn_if_open(mode: AuthMode) -> None:
    """Say loudly, at start-up, that the API lets anyone in."""
    if mode == "none":
        logger.warning(
            "!!! BLOGPIPE_AUTH=none: the API accepts every caller without a key, as the single"
            " tenant 'default'. Use this only behind a trusted gateway or on localhost. !!!",
            extra={"action": "auth_disabled"},
        )
