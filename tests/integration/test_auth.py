"""API keys: who gets in (401), what they may do (403), revocation, storage, the CLI."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import uuid
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from api.auth import UNAUTHORIZED_MESSAGE, required_scope
from core.db import audit
from core.db.apikeys import ApiKeyRepository, generate_key, hash_key
from core.errors import ConfigError
from core.settings import Settings
from tests.support.apikeys import (
    VALID,
    WORKER_SECRET,
    build_app,
    client_for,
    make_key,
    secure_settings,
)
from tests.support.pipeline import REPO

TIMEOUT = 10
SUBMIT = "/api/v1/blog/generate-enhanced?async_mode=true"


async def call(client: httpx.AsyncClient, method: str, url: str, **kw: Any) -> httpx.Response:
    return await asyncio.wait_for(client.request(method, url, **kw), timeout=TIMEOUT)


def assert_unauthorized(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    assert response.json() == {"detail": UNAUTHORIZED_MESSAGE}
    assert response.headers["www-authenticate"] == 'Bearer realm="blogpipe"'


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        "Basic dXNlcjpwYXNz",
        "Token bp_live_x",
        "Bearer bp_live_short",
        "Bearer " + "x" * 51,
        "Bearer " + generate_key(),  # well-formed, never issued
        "Bearer " + generate_key()[:-1] + "!",
        "Bearer\t" + generate_key(),
    ],
    ids=[
        "missing",
        "empty",
        "scheme-only",
        "scheme-space",
        "basic",
        "other-scheme",
        "short-key",
        "not-a-key",
        "unknown-key",
        "bad-char",
        "tab",
    ],
)
async def test_bad_credentials_get_the_same_401(engine: AsyncEngine, header: str | None) -> None:
    app = build_app(engine, secure_settings())
    headers = {"Authorization": header} if header is not None else {}
    async with client_for(app) as client:
        for method, url in [("GET", "/api/v1/blog/jobs"), ("POST", SUBMIT)]:
            assert_unauthorized(await call(client, method, url, headers=headers, json=VALID))
        assert await job_count(engine) == 0


async def test_two_authorization_headers_are_refused(engine: AsyncEngine) -> None:
    key = await make_key(engine, "acme")
    app = build_app(engine, secure_settings())
    async with client_for(app) as client:
        response = await call(
            client,
            "GET",
            "/api/v1/blog/jobs",
            headers=[("Authorization", f"Bearer {key}"), ("Authorization", f"Bearer {key}")],
        )
    assert_unauthorized(response)


async def test_scheme_is_case_insensitive(engine: AsyncEngine) -> None:
    key = await make_key(engine, "acme")
    async with client_for(build_app(engine, secure_settings())) as client:
        response = await call(
            client, "GET", "/api/v1/blog/jobs", headers={"Authorization": f"bearer {key}"}
        )
    assert response.status_code == 200


async def test_revoked_key_is_refused_at_once(engine: AsyncEngine) -> None:
    repo = ApiKeyRepository(engine)
    key, secret = await repo.create("acme", ["jobs:read"])
    async with client_for(build_app(engine, secure_settings()), secret) as client:
        assert (await call(client, "GET", "/api/v1/blog/jobs")).status_code == 200
        revoked = await repo.revoke(key.id)
        assert revoked is not None and revoked.revoked_at is not None
        assert_unauthorized(await call(client, "GET", "/api/v1/blog/jobs"))
    assert await repo.revoke(key.id) is not None  # idempotent
    assert await repo.revoke("key_missing") is None


# (method, url, body) -> the scope it needs
def endpoints(job_id: str, delivery_id: str) -> list[tuple[str, str, Any, str]]:
    return [
        ("POST", SUBMIT, VALID, "jobs:write"),
        ("POST", "/api/v1/blog/generate-enhanced", VALID, "jobs:write"),
        ("GET", "/api/v1/blog/jobs", None, "jobs:read"),
        ("GET", f"/api/v1/blog/jobs/{job_id}", None, "jobs:read"),
        ("GET", f"/api/v1/blog/jobs/{job_id}/deliveries", None, "jobs:read"),
        ("POST", f"/api/v1/webhooks/deliveries/{delivery_id}/redeliver", None, "operator"),
        ("POST", "/api/v1/webhooks/deliveries/recover", {"dry_run": True}, "operator"),
        ("POST", "/api/v1/webhooks/endpoints/enable", {"url": "http://127.0.0.1:9/x"}, "operator"),
        ("POST", f"/api/v1/blog/jobs/{job_id}/cancel", None, "operator"),
        ("POST", f"/api/v1/blog/jobs/{job_id}/replay", None, "operator"),
    ]


@pytest.mark.parametrize("scope", ["jobs:write", "jobs:read", "operator"])
async def test_scope_matrix(engine: AsyncEngine, scope: str) -> None:
    full = await make_key(engine, "acme")
    limited = await make_key(engine, "acme", [scope])
    app = build_app(engine, secure_settings())
    async with client_for(app, full) as client:
        job_id = (await call(client, "POST", SUBMIT, json=VALID)).json()["job_id"]
    async with client_for(app, limited) as client:
        for method, url, body, needed in endpoints(job_id, str(uuid.uuid4())):
            response = await call(client, method, url, json=body)
            if needed == scope:
                assert response.status_code not in (401, 403), (method, url, response.text)
            else:
                assert response.status_code == 403, (method, url, response.text)
                assert response.json()["required_scope"] == needed
                assert f"'{needed}' scope" in response.json()["detail"]
                assert f'scope="{needed}"' in response.headers["www-authenticate"]


def test_route_scopes() -> None:
    assert required_scope("GET", "/healthz") is None
    assert required_scope("GET", "/openapi.json") is None
    assert required_scope("POST", "/pubsub/push/blog-research") is None
    assert required_scope("POST", "/api/v1/blog/worker") is None
    assert required_scope("POST", "/api/v1/blog/batch") == "jobs:write"
    assert required_scope("GET", "/api/v1/blog/jobs/x/events") == "jobs:read"
    # Anything new and unlisted under /api/ is an operator action until said otherwise.
    assert required_scope("POST", "/api/v1/blog/jobs/replay") == "operator"
    assert required_scope("DELETE", "/api/v1/blog/jobs/x") == "operator"
    assert required_scope("GET", "/api/v1/admin/anything") == "operator"


async def test_public_and_self_authenticated_routes_need_no_key(engine: AsyncEngine) -> None:
    async with client_for(build_app(engine, secure_settings())) as client:
        assert (await call(client, "GET", "/healthz")).status_code == 200
        assert (await call(client, "GET", "/openapi.json")).status_code == 200
        worker = await call(
            client,
            "POST",
            "/api/v1/blog/worker",
            json={"job_id": str(uuid.uuid4())},
            headers={"X-Worker-Secret": WORKER_SECRET},
        )
        assert worker.status_code == 404  # let in by its own secret, then: no such job
        refused = await call(client, "POST", "/api/v1/blog/worker", json={"job_id": "x"})
        assert refused.status_code == 401 and "error" in refused.json()


async def test_keys_are_stored_as_hashes_and_audited(engine: AsyncEngine) -> None:
    repo = ApiKeyRepository(engine)
    key, secret = await repo.create("acme", ["jobs:read", "jobs:write", "jobs:read"], name="ci")
    assert secret.startswith("bp_live_") and len(secret) == len("bp_live_") + 43
    assert key.scopes == ("jobs:write", "jobs:read")
    async with engine.connect() as conn:
        dump = str((await conn.execute(text("SELECT * FROM api_keys"))).all())
    assert secret not in dump and hash_key(secret) in dump
    authenticated = await repo.authenticate(secret)
    assert authenticated is not None and authenticated.id == key.id
    await repo.revoke(key.id, actor=audit.Actor.cli("acme"))
    entries = await audit.entries(engine, tenant="acme")
    assert [(e.action, e.target, e.actor) for e in entries] == [
        ("api_key.revoked", key.id, "cli"),
        ("api_key.created", key.id, "system"),
    ]
    assert secret not in str(entries)


async def test_bad_tenant_or_scope_is_refused(engine: AsyncEngine) -> None:
    from core.db.apikeys import ApiKeyError

    repo = ApiKeyRepository(engine)
    with pytest.raises(ApiKeyError, match="scope"):
        await repo.create("acme", ["admin"])
    with pytest.raises(ApiKeyError, match="at least one"):
        await repo.create("acme", [])
    with pytest.raises(ApiKeyError, match="tenant"):
        await repo.create("acme corp", ["jobs:read"])


async def test_none_mode_lets_everyone_in_as_default_and_says_so(
    engine: AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="blogpipe.api.auth")
    app = build_app(engine, secure_settings(auth="none"))
    assert any(r.__dict__.get("action") == "auth_disabled" for r in caplog.records)
    async with client_for(app) as client:
        job_id = (await call(client, "POST", SUBMIT, json=VALID)).json()["job_id"]
        assert (await call(client, "GET", f"/api/v1/blog/jobs/{job_id}")).status_code == 200
    async with engine.connect() as conn:
        tenant = (await conn.execute(text("SELECT tenant FROM jobs"))).scalar_one()
    assert tenant == "default"


def test_auth_setting() -> None:
    assert Settings.from_env({}).auth == "apikey"
    assert Settings().auth == "apikey"
    assert Settings.from_env({"BLOGPIPE_AUTH": "none"}).auth == "none"
    with pytest.raises(ConfigError, match="BLOGPIPE_AUTH"):
        Settings.from_env({"BLOGPIPE_AUTH": "off"})


def blogpipe(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the real CLI (its own process and event loop)."""
    env = {**os.environ, "DATABASE_URL": database_url}
    return subprocess.run(
        [sys.executable, "-m", "blogpipe", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_keys_cli(database_url: str) -> None:
    created = blogpipe(
        database_url,
        "keys",
        "create",
        "--tenant",
        "acme",
        "--scope",
        "jobs:write",
        "--scope",
        "jobs:read",
        "--name",
        "ci",
    )
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip().splitlines()[-1]
    assert secret.startswith("bp_live_")
    key_id = created.stdout.split()[2]
    listing = blogpipe(database_url, "keys", "list")
    assert key_id in listing.stdout and "acme" in listing.stdout and "active" in listing.stdout
    assert secret not in listing.stdout + listing.stderr
    revoked = blogpipe(database_url, "keys", "revoke", key_id)
    assert revoked.returncode == 0 and "Revoked" in revoked.stdout
    assert "revoked" in blogpipe(database_url, "keys", "list", "--tenant", "acme").stdout
    assert blogpipe(database_url, "keys", "revoke", "key_nope").returncode == 1
    bad = blogpipe(database_url, "keys", "create", "--tenant", "acme", "--scope", "admin")
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


async def job_count(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(text("SELECT count(*) FROM jobs"))).scalar_one())


async def test_keys_and_webhook_secrets_never_reach_the_logs(
    engine: AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    from core import logredact

    logredact.install()
    caplog.set_level(logging.DEBUG)
    secret_hook = "whsec_c2VjcmV0LXRoYXQtbXVzdC1ub3QtbGVhaw=="
    key = await make_key(engine, "acme")
    wrong = generate_key()
    app = build_app(engine, secure_settings(webhook_secret=secret_hook))
    async with client_for(app, key) as client:
        submitted = await call(
            client,
            "POST",
            SUBMIT,
            json={**VALID, "custom_instructions": f"sign with {secret_hook}"},
        )
        assert submitted.status_code == 202
        # The ping is signed with the secret and logs the URL it was sent to.
        ping = await call(
            client,
            "POST",
            "/api/v1/webhooks/ping",
            json={"url": f"http://127.0.0.1:9/hook?token={secret_hook}&k={key}"},
        )
        assert ping.status_code == 200
        assert_unauthorized(
            await call(
                client, "GET", "/api/v1/blog/jobs", headers={"Authorization": f"Bearer {wrong}"}
            )
        )
    assert any(r.__dict__.get("action") == "webhook_ping" for r in caplog.records)
    assert any(r.__dict__.get("action") == "api_key_rejected" for r in caplog.records)
    captured = caplog.text + "".join(repr(vars(record)) for record in caplog.records)
    for secret in (key, wrong, secret_hook):
        assert secret not in captured


async def test_dev_key_is_kept_and_replaced_when_revoked(engine: AsyncEngine, tmp_path) -> None:
    from blogpipe.keys_cli import DEV_TENANT, ensure_dev_key

    first = await asyncio.wait_for(ensure_dev_key(engine, tmp_path), timeout=TIMEOUT)
    assert await asyncio.wait_for(ensure_dev_key(engine, tmp_path), timeout=TIMEOUT) == first
    assert (tmp_path / "api_key").stat().st_mode & 0o777 == 0o600
    repo = ApiKeyRepository(engine)
    key = await repo.authenticate(first)
    assert (
        key is not None
        and key.tenant == DEV_TENANT
        and set(key.scopes) == {"jobs:write", "jobs:read", "operator"}
    )
    await repo.revoke(key.id)
    second = await asyncio.wait_for(ensure_dev_key(engine, tmp_path), timeout=TIMEOUT)
    assert second != first and await repo.authenticate(second) is not None
