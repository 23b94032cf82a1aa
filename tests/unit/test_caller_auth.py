"""Google OIDC verification and the worker/push authorizers, against self-served certs."""

from __future__ import annotations

import datetime as dt
import http.server
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from google.auth import crypt, jwt
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from api.caller_auth import guarded, push_authorizer, worker_authorizer
from core.google_auth import (
    CachingCertsRequest,
    CertificatesUnavailable,
    InvalidIdToken,
    verify_google_oidc,
)
from core.settings import Settings

WORKER_URL = "https://blogpipe.example/api/v1/blog/worker"
PUSH_AUDIENCE = "https://blogpipe.example/api/v1/pubsub/push"
TASKS_SA = "tasks@blogpipe-test.iam.gserviceaccount.com"
KID = "test-key-1"


@dataclass
class Key:
    """An RSA key with its self-signed certificate, signing under ``kid``."""

    kid: str
    private_pem: bytes
    cert_pem: str

    @classmethod
    def generate(cls, kid: str) -> Key:
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "blogpipe-test")])
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(private.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .sign(private, hashes.SHA256())
        )
        private_pem = private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return cls(kid, private_pem, cert.public_bytes(serialization.Encoding.PEM).decode())

    def sign(self, **overrides: Any) -> str:
        """A Cloud Tasks-like ID token; ``overrides`` replace claims (None drops one)."""
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": "https://accounts.google.com",
            "aud": WORKER_URL,
            "sub": "1234567890",
            "email": TASKS_SA,
            "email_verified": True,
            "iat": now,
            "exp": now + 3600,
        }
        claims.update(overrides)
        claims = {k: v for k, v in claims.items() if v is not None}
        signer = crypt.RSASigner.from_string(self.private_pem, key_id=self.kid)
        return jwt.encode(signer, claims).decode()


@dataclass
class CertsServer:
    """Serves ``{kid: pem}`` like Google's v1 certs endpoint, counting fetches."""

    certs: dict[str, str]
    url: str = ""
    fetches: int = 0
    _server: http.server.ThreadingHTTPServer | None = field(default=None, repr=False)


@pytest.fixture(scope="module")
def key() -> Key:
    return Key.generate(KID)


@pytest.fixture(scope="module")
def certs_server(key: Key) -> Iterator[CertsServer]:
    state = CertsServer({key.kid: key.cert_pem})

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            state.fetches += 1
            body = json.dumps(state.certs).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Cache-Control", "public, max-age=3600")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/oauth2/v1/certs"
    state._server = server
    yield state
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


@pytest.fixture
def certs_request() -> CachingCertsRequest:
    return CachingCertsRequest()


def verify(token: str, server: CertsServer, request: CachingCertsRequest, **kw: Any) -> dict:
    kw.setdefault("audience", WORKER_URL)
    kw.setdefault("allowed_emails", [TASKS_SA])
    return verify_google_oidc(token, certs_url=server.url, request=request, **kw)


# --- verify_google_oidc ---------------------------------------------------------------


def test_valid_token_is_accepted(key: Key, certs_server: CertsServer, certs_request) -> None:
    claims = verify(key.sign(), certs_server, certs_request)
    assert claims["email"] == TASKS_SA
    assert claims["aud"] == WORKER_URL


def test_issuer_without_scheme_is_accepted(key: Key, certs_server, certs_request) -> None:
    assert verify(key.sign(iss="accounts.google.com"), certs_server, certs_request)


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"iat": int(time.time()) - 7200, "exp": int(time.time()) - 3600}, "expired"),
        ({"aud": "https://someone-else.example/"}, "audience"),
        ({"iss": "https://evil.example"}, "issuer"),
        ({"email": "intruder@other.iam.gserviceaccount.com"}, "not an allowed"),
        ({"email_verified": False}, "not verified"),
        ({"email": None}, "no email"),
        ({"exp": None}, "malformed"),
    ],
    ids=[
        "expired",
        "wrong-audience",
        "wrong-issuer",
        "unlisted-email",
        "unverified",
        "no-email",
        "no-exp",
    ],
)
def test_bad_claims_are_rejected(
    key: Key, certs_server: CertsServer, certs_request, overrides: dict, reason: str
) -> None:
    with pytest.raises(InvalidIdToken, match=f"(?i){reason}"):
        verify(key.sign(**overrides), certs_server, certs_request)


def test_bad_signature_is_rejected(certs_server: CertsServer, certs_request) -> None:
    forged = Key.generate(KID).sign()  # same kid, another private key
    with pytest.raises(InvalidIdToken, match="signature"):
        verify(forged, certs_server, certs_request)


def test_unknown_key_id_is_rejected(certs_server: CertsServer, certs_request) -> None:
    with pytest.raises(InvalidIdToken, match="unknown key"):
        verify(Key.generate("other-kid").sign(), certs_server, certs_request)


@pytest.mark.parametrize("token", ["", "not-a-jwt", "a.b.c"])
def test_malformed_token_is_rejected(token: str, certs_server, certs_request) -> None:
    with pytest.raises(InvalidIdToken):
        verify(token, certs_server, certs_request)


def test_empty_allow_list_skips_email_checks(key: Key, certs_server, certs_request) -> None:
    claims = verify(
        key.sign(email="anyone@x.example", email_verified=False),
        certs_server,
        certs_request,
        allowed_emails=[],
    )
    assert claims["email"] == "anyone@x.example"


def test_missing_audience_is_refused(key: Key, certs_server, certs_request) -> None:
    with pytest.raises(InvalidIdToken, match="audience"):
        verify(key.sign(), certs_server, certs_request, audience="")


def test_certificates_are_cached(key: Key, certs_server: CertsServer) -> None:
    request = CachingCertsRequest()
    before = certs_server.fetches
    for _ in range(3):
        verify(key.sign(), certs_server, request)
    assert certs_server.fetches == before + 1


def test_unreachable_certificates_are_not_the_callers_fault(key: Key, certs_request) -> None:
    with pytest.raises(CertificatesUnavailable):
        verify_google_oidc(
            key.sign(),
            audience=WORKER_URL,
            allowed_emails=[TASKS_SA],
            certs_url="http://127.0.0.1:9/certs",
            request=certs_request,
        )


# --- authorizers over HTTP ------------------------------------------------------------


async def whoami(request: Request) -> Response:
    return JSONResponse({"caller": request.state.caller})


def make_client(settings: Settings, certs_url: str) -> httpx.AsyncClient:
    request = CachingCertsRequest()
    app = Starlette(
        routes=[
            Route(
                "/worker",
                guarded(
                    worker_authorizer(settings, certs_url=certs_url, certs_request=request), whoami
                ),
                methods=["POST"],
            ),
            Route(
                "/push",
                guarded(
                    push_authorizer(settings, certs_url=certs_url, certs_request=request), whoami
                ),
                methods=["POST"],
            ),
        ]
    )
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


SECRET_SETTINGS = Settings(worker_shared_secret="s3cret", cloud_run_worker_url=WORKER_URL)
OIDC_SETTINGS = Settings(
    cloud_run_worker_url=WORKER_URL,
    cloud_tasks_service_account=TASKS_SA,
    pubsub_push_audience=PUSH_AUDIENCE,
    worker_allowed_service_accounts=(TASKS_SA,),
)


@pytest.mark.parametrize(
    ("headers", "status"),
    [({"X-Worker-Secret": "s3cret"}, 200), ({"X-Worker-Secret": "wrong"}, 403), ({}, 401)],
    ids=["right", "wrong", "missing"],
)
async def test_shared_secret(certs_server: CertsServer, headers: dict, status: int) -> None:
    async with make_client(SECRET_SETTINGS, certs_server.url) as client:
        response = await client.post("/worker", headers=headers, timeout=10)
    assert response.status_code == status
    if status != 200:
        assert "error" in response.json()


async def test_bearer_token_accepted(key: Key, certs_server: CertsServer) -> None:
    async with make_client(OIDC_SETTINGS, certs_server.url) as client:
        response = await client.post(
            "/worker", headers={"Authorization": f"Bearer {key.sign()}"}, timeout=10
        )
    assert response.status_code == 200
    assert response.json() == {"caller": TASKS_SA}


@pytest.mark.parametrize(
    ("authorization", "status"),
    [(None, 401), ("Bearer not-a-token", 403), ("Basic dXNlcjpwYXNz", 403)],
    ids=["missing", "invalid", "wrong-scheme"],
)
async def test_bearer_token_rejected(
    certs_server: CertsServer, authorization: str | None, status: int
) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    async with make_client(OIDC_SETTINGS, certs_server.url) as client:
        response = await client.post("/worker", headers=headers, timeout=10)
    assert response.status_code == status
    assert response.json()["error"]
    if status == 401:
        assert response.headers["www-authenticate"] == "Bearer"


async def test_token_for_another_audience_is_forbidden(key: Key, certs_server) -> None:
    token = key.sign(aud=PUSH_AUDIENCE)
    async with make_client(OIDC_SETTINGS, certs_server.url) as client:
        worker = await client.post(
            "/worker", headers={"Authorization": f"Bearer {token}"}, timeout=10
        )
        push = await client.post("/push", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert worker.status_code == 403
    assert "audience" in worker.json()["error"]
    assert push.status_code == 200


async def test_either_credential_is_enough(key: Key, certs_server: CertsServer) -> None:
    settings = OIDC_SETTINGS.with_changes(worker_shared_secret="s3cret")
    async with make_client(settings, certs_server.url) as client:
        response = await client.post(
            "/worker",
            headers={"X-Worker-Secret": "wrong", "Authorization": f"Bearer {key.sign()}"},
            timeout=10,
        )
    assert response.status_code == 200


async def test_push_accepts_secret_as_query_token(certs_server: CertsServer) -> None:
    async with make_client(SECRET_SETTINGS, certs_server.url) as client:
        ok = await client.post("/push?token=s3cret", timeout=10)
        wrong = await client.post("/push?token=nope", timeout=10)
    assert ok.status_code == 200
    assert wrong.status_code == 403


async def test_unconfigured_endpoint_refuses_everyone(certs_server: CertsServer) -> None:
    async with make_client(Settings(), certs_server.url) as client:
        response = await client.post("/worker", headers={"X-Worker-Secret": "x"}, timeout=10)
    assert response.status_code == 401
    assert "not configured" in response.json()["error"]


async def test_unreachable_certs_answer_503(key: Key) -> None:
    async with make_client(OIDC_SETTINGS, "http://127.0.0.1:9/certs") as client:
        response = await client.post(
            "/worker", headers={"Authorization": f"Bearer {key.sign()}"}, timeout=10
        )
    assert response.status_code == 503
