"""Verify Google-signed OIDC ID tokens (Cloud Tasks and Pub/Sub push callers).

Signature, expiry and audience are checked by google-auth (``id_token.verify_token``);
issuer, e-mail allow-list and ``email_verified`` here. Google's certificates are fetched
through a google-auth ``Request`` that caches them as long as ``Cache-Control: max-age``
allows, so a verification costs no network round trip on the hot path.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from google.auth import exceptions as auth_exceptions
from google.auth import transport
from google.oauth2 import id_token

from core.errors import BlogpipeError

GOOGLE_CERTS_URL = "https://www.googleapis.com/oauth2/v1/certs"
GOOGLE_ISSUERS = ("accounts.google.com", "https://accounts.google.com")

_MAX_AGE = re.compile(r"max-age=(\d+)")
_DEFAULT_TTL = 300.0
_FETCH_TIMEOUT = 10.0


class InvalidIdToken(BlogpipeError):
    """The caller's ID token is not acceptable; the message says why."""


class CertificatesUnavailable(BlogpipeError):
    """Google's public certificates could not be fetched (not the caller's fault)."""


@dataclass(frozen=True)
class _Response(transport.Response):
    """A google-auth transport response held in the cache."""

    status_code: int
    header_map: Mapping[str, str]
    body: bytes

    @property
    def status(self) -> int:
        return self.status_code

    @property
    def headers(self) -> Mapping[str, str]:
        return self.header_map

    @property
    def data(self) -> bytes:
        return self.body


class CachingCertsRequest(transport.Request):
    """A google-auth ``Request`` for GETs of certificate URLs, cached per ``max-age``.

    Thread-safe: verification runs in worker threads. Uses urllib, so no connection
    pool outlives a fetch (certificates change every few hours).
    """

    def __init__(
        self, *, default_ttl: float = _DEFAULT_TTL, timeout: float = _FETCH_TIMEOUT
    ) -> None:
        self.default_ttl = default_ttl
        self.timeout = timeout
        self._cache: dict[str, tuple[float, _Response]] = {}
        self._lock = threading.Lock()

    def __call__(
        self,
        url: str,
        method: str = "GET",
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> _Response:
        if method != "GET" or body is not None:
            raise auth_exceptions.TransportError("CachingCertsRequest only fetches certificates")
        with self._lock:
            cached = self._cache.get(url)
            if cached is not None and cached[0] > time.monotonic():
                return cached[1]
            response = self._fetch(url, headers or {}, timeout or self.timeout)
            if response.status == 200:
                self._cache[url] = (time.monotonic() + self._ttl(response), response)
            return response

    def clear(self) -> None:
        """Forget every cached response."""
        with self._lock:
            self._cache.clear()

    def _ttl(self, response: _Response) -> float:
        control = response.headers.get("cache-control", "")
        match = _MAX_AGE.search(control)
        if "no-store" in control or "no-cache" in control:
            return 0.0
        return float(match.group(1)) if match else self.default_ttl

    @staticmethod
    def _fetch(url: str, headers: Mapping[str, str], timeout: float) -> _Response:
        request = urllib.request.Request(url, headers=dict(headers), method="GET")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as reply:  # noqa: S310
                return _Response(
                    reply.status, {k.lower(): v for k, v in reply.headers.items()}, reply.read()
                )
        except urllib.error.HTTPError as exc:
            with exc:
                return _Response(exc.code, {}, exc.read())
        except (OSError, ValueError) as exc:
            raise auth_exceptions.TransportError(f"Could not fetch {url}: {exc}") from exc


_default_request = CachingCertsRequest()


def verify_google_oidc(
    token: str,
    *,
    audience: str,
    allowed_emails: Sequence[str],
    certs_url: str | None = None,
    request: CachingCertsRequest | None = None,
    clock_skew_seconds: int = 10,
) -> dict[str, Any]:
    """Verify a Google-signed ID token and return its claims.

    Checks signature, ``iat``/``exp``, ``aud`` == ``audience``, a Google issuer, and,
    when ``allowed_emails`` is non-empty, that ``email`` is listed and verified.
    Raises InvalidIdToken (reject the caller) or CertificatesUnavailable (retry later).
    """
    if not audience:
        raise InvalidIdToken("No audience configured to verify the token against")
    try:
        claims = dict(
            id_token.verify_token(
                token,
                request or _default_request,
                audience=audience,
                certs_url=certs_url or GOOGLE_CERTS_URL,
                clock_skew_in_seconds=clock_skew_seconds,
            )
        )
    except auth_exceptions.TransportError as exc:
        raise CertificatesUnavailable(f"Could not fetch Google certificates: {exc}") from exc
    except (ValueError, auth_exceptions.GoogleAuthError) as exc:
        raise InvalidIdToken(_reason(exc)) from exc
    if claims.get("iss") not in GOOGLE_ISSUERS:
        raise InvalidIdToken(f"Token issuer {claims.get('iss')!r} is not Google")
    if allowed_emails:
        email = claims.get("email")
        if not email:
            raise InvalidIdToken("Token has no email claim")
        if email not in allowed_emails:
            raise InvalidIdToken(f"Caller {email} is not an allowed service account")
        if claims.get("email_verified") not in (True, "true"):
            raise InvalidIdToken(f"Caller email {email} is not verified")
    return claims


async def verify_google_oidc_async(
    token: str,
    *,
    audience: str,
    allowed_emails: Sequence[str],
    certs_url: str | None = None,
    request: CachingCertsRequest | None = None,
) -> dict[str, Any]:
    """``verify_google_oidc`` off the event loop (a certificate fetch may block)."""
    return await asyncio.to_thread(
        verify_google_oidc,
        token,
        audience=audience,
        allowed_emails=allowed_emails,
        certs_url=certs_url,
        request=request,
    )


def _reason(exc: BaseException) -> str:
    """google-auth's message, shortened to what a caller may be told."""
    text = str(exc).lower()
    if "expired" in text:
        return "Token expired"
    if "audience" in text:
        return "Token audience mismatch"
    if "signature" in text:
        return "Token signature is invalid"
    if "key id" in text:
        return "Token signed by an unknown key"
    if "too early" in text:
        return "Token used before its issue time"
    return "Malformed or invalid token"
