"""Unsigned (``alg: none``) and algorithm-confused ID tokens are refused."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import pytest

from core.google_auth import CachingCertsRequest, InvalidIdToken
from tests.unit import test_caller_auth as caller_auth
from tests.unit.test_caller_auth import (
    KID,
    OIDC_SETTINGS,
    TASKS_SA,
    WORKER_URL,
    CertsServer,
    Key,
    make_client,
    verify,
)

# The self-served certificates and signing key of the caller-auth tests.
key = caller_auth.key
certs_server = caller_auth.certs_server
certs_request = caller_auth.certs_request


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def forged(alg: str, secret: bytes | None = None, **header: Any) -> str:
    """A token with valid-looking claims, 'signed' with ``alg`` (HMAC with ``secret``)."""
    now = int(time.time())
    claims = {
        "iss": "https://accounts.google.com",
        "aud": WORKER_URL,
        "sub": "1",
        "email": TASKS_SA,
        "email_verified": True,
        "iat": now,
        "exp": now + 3600,
    }
    signing_input = (
        _b64(json.dumps({"alg": alg, "typ": "JWT", "kid": KID, **header}).encode())
        + "."
        + _b64(json.dumps(claims).encode())
    )
    signature = b""
    if secret is not None:
        signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
def test_alg_none_is_rejected(
    alg: str, certs_server: CertsServer, certs_request: CachingCertsRequest
) -> None:
    with pytest.raises(InvalidIdToken):
        verify(forged(alg), certs_server, certs_request)


def test_hmac_with_the_public_certificate_is_rejected(
    key: Key, certs_server: CertsServer, certs_request: CachingCertsRequest
) -> None:
    # The classic algorithm confusion: HS256 keyed with the verifier's public certificate.
    with pytest.raises(InvalidIdToken):
        verify(forged("HS256", key.cert_pem.encode()), certs_server, certs_request)


async def test_worker_refuses_an_unsigned_token(certs_server: CertsServer) -> None:
    async with make_client(OIDC_SETTINGS, certs_server.url) as client:
        response = await client.post(
            "/worker", headers={"Authorization": f"Bearer {forged('none')}"}, timeout=10
        )
    assert response.status_code == 403
