"""Who may call the worker and Pub/Sub push endpoints.

Two ways in, either enough when configured:

- a shared secret in ``X-Worker-Secret`` (local runs and the emulators, which send no
  OIDC token), compared in constant time;
- ``Authorization: Bearer <Google OIDC ID token>`` for the configured audience, signed by
  Google, from an allowed service account (Cloud Tasks and Pub/Sub push in production).

An authorizer returns None to let the request through, or the response to send:
401 when no credential was presented, 403 when one was presented and is wrong, 503 when
Google's certificates cannot be fetched (the caller retries). With neither way
configured, everything is refused with 401 rather than left open.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from core.settings import Settings

if TYPE_CHECKING:
    from core.google_auth import CachingCertsRequest

logger = logging.getLogger("blogpipe.api.auth")

SECRET_HEADER = "X-Worker-Secret"
PUSH_TOKEN_PARAM = "token"

Authorizer = Callable[[Request], Awaitable[Response | None]]
Endpoint = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True)
class CallerPolicy:
    """What an endpoint accepts; an empty field turns that way in off."""

    endpoint: str
    shared_secret: str | None = None
    audience: str | None = None
    allowed_emails: tuple[str, ...] = ()
    secret_query_param: str | None = None
    unconfigured_hint: str = ""

    @property
    def configured(self) -> bool:
        """True when at least one way in is set up."""
        return bool(self.shared_secret or self.audience)


def worker_policy(settings: Settings) -> CallerPolicy:
    """The Cloud Tasks worker endpoint's policy.

    OIDC is on when an audience or a service account is configured; the audience
    defaults to the worker URL, and the allow-list to the account Cloud Tasks signs as.
    """
    oidc = bool(
        settings.worker_audience
        or settings.worker_allowed_service_accounts
        or settings.cloud_tasks_service_account
    )
    allowed = settings.worker_allowed_service_accounts
    if not allowed and settings.cloud_tasks_service_account:
        allowed = (settings.cloud_tasks_service_account,)
    return CallerPolicy(
        endpoint="worker endpoint",
        shared_secret=settings.worker_shared_secret,
        audience=(settings.worker_audience or settings.worker_url) if oidc else None,
        allowed_emails=allowed,
        unconfigured_hint=(
            "set WORKER_SHARED_SECRET, or WORKER_OIDC_AUDIENCE / "
            "WORKER_ALLOWED_SERVICE_ACCOUNTS / CLOUD_TASKS_SERVICE_ACCOUNT"
        ),
    )


def push_policy(settings: Settings) -> CallerPolicy:
    """The Pub/Sub push endpoints' policy.

    OIDC with ``PUBSUB_PUSH_AUDIENCE`` and the ``WORKER_ALLOWED_SERVICE_ACCOUNTS``
    allow-list; the shared secret may also come as ``?token=`` because a push
    subscription cannot set headers.
    """
    return CallerPolicy(
        endpoint="Pub/Sub push endpoint",
        shared_secret=settings.worker_shared_secret,
        audience=settings.pubsub_push_audience,
        allowed_emails=settings.worker_allowed_service_accounts,
        secret_query_param=PUSH_TOKEN_PARAM,
        unconfigured_hint="set PUBSUB_PUSH_AUDIENCE or WORKER_SHARED_SECRET",
    )


def worker_authorizer(
    settings: Settings,
    *,
    certs_url: str | None = None,
    certs_request: CachingCertsRequest | None = None,
) -> Authorizer:
    """The authorizer for ``POST /api/v1/blog/worker``."""
    return caller_authorizer(
        worker_policy(settings), certs_url=certs_url, certs_request=certs_request
    )


def push_authorizer(
    settings: Settings,
    *,
    certs_url: str | None = None,
    certs_request: CachingCertsRequest | None = None,
) -> Authorizer:
    """The authorizer for Pub/Sub push endpoints."""
    return caller_authorizer(
        push_policy(settings), certs_url=certs_url, certs_request=certs_request
    )


def caller_authorizer(
    policy: CallerPolicy,
    *,
    certs_url: str | None = None,
    certs_request: CachingCertsRequest | None = None,
) -> Authorizer:
    """An authorizer enforcing ``policy`` (``certs_url`` overrides Google's, for tests)."""
    if policy.audience and not policy.allowed_emails:
        logger.warning(
            "The %s accepts any Google-signed token for audience %s; set an allow-list",
            policy.endpoint,
            policy.audience,
            extra={"action": "caller_auth_open_allow_list", "endpoint": policy.endpoint},
        )
    if policy.audience:
        # google-auth and cryptography (about 8 MB) load only where OIDC is on.
        from core import google_auth

    async def authorize(request: Request) -> Response | None:
        if not policy.configured:
            return _reject(
                request, 401, f"The {policy.endpoint} is not configured: {policy.unconfigured_hint}"
            )
        reasons: list[str] = []
        if policy.shared_secret:
            given = request.headers.get(SECRET_HEADER)
            if given is None and policy.secret_query_param:
                given = request.query_params.get(policy.secret_query_param)
            if given is not None:
                if hmac.compare_digest(given.encode(), policy.shared_secret.encode()):
                    request.state.caller = "shared-secret"
                    return None
                reasons.append(f"Invalid {SECRET_HEADER}")
        if policy.audience:
            header = request.headers.get("authorization")
            if header is not None:
                scheme, _, token = header.partition(" ")
                if scheme.lower() != "bearer" or not token.strip():
                    reasons.append("Authorization header must be 'Bearer <token>'")
                else:
                    try:
                        claims = await google_auth.verify_google_oidc_async(
                            token.strip(),
                            audience=policy.audience,
                            allowed_emails=policy.allowed_emails,
                            certs_url=certs_url,
                            request=certs_request,
                        )
                    except google_auth.CertificatesUnavailable as exc:
                        logger.error(
                            "Cannot verify caller of the %s: %s",
                            policy.endpoint,
                            exc,
                            extra={"action": "caller_auth_unavailable"},
                        )
                        return JSONResponse(
                            {"error": "Cannot verify credentials right now"}, status_code=503
                        )
                    except google_auth.InvalidIdToken as exc:
                        reasons.append(str(exc))
                    else:
                        request.state.caller = claims.get("email") or claims.get("sub")
                        return None
        if reasons:
            return _reject(request, 403, "; ".join(reasons))
        return _reject(request, 401, _missing_message(policy))

    return authorize


def guarded(authorizer: Authorizer, endpoint: Endpoint) -> Endpoint:
    """Wrap a Starlette endpoint so it runs only for authorized callers."""

    async def guarded_endpoint(request: Request) -> Response:
        rejection = await authorizer(request)
        if rejection is not None:
            return rejection
        return await endpoint(request)

    return guarded_endpoint


def _missing_message(policy: CallerPolicy) -> str:
    ways = []
    if policy.shared_secret:
        ways.append(f"an {SECRET_HEADER} header")
    if policy.audience:
        ways.append("an 'Authorization: Bearer <Google OIDC token>' header")
    return f"Missing credentials: the {policy.endpoint} needs {' or '.join(ways)}"


def _reject(request: Request, status: int, message: str) -> Response:
    logger.warning(
        "Rejected %s %s: %s",
        request.method,
        request.url.path,
        message,
        extra={"action": "caller_rejected", "status": status, "path": request.url.path},
    )
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"error": message}, status_code=status, headers=headers)
