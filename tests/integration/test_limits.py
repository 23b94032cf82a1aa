"""Limits: per-tenant rate limit and in-flight cap (429 + Retry-After), body size (413),
content type (415), headers (431), JSON depth (400), and CORS."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from api.limits import TokenBuckets, json_too_deep
from core.errors import ConfigError
from core.settings import Settings
from tests.support.apikeys import VALID, build_app, client_for, make_key, secure_settings

TIMEOUT = 10
SUBMIT = "/api/v1/blog/generate-enhanced?async_mode=true"


async def call(client: httpx.AsyncClient, method: str, url: str, **kw: Any) -> httpx.Response:
    return await asyncio.wait_for(client.request(method, url, **kw), timeout=TIMEOUT)


async def test_rate_limit_is_per_tenant_with_retry_after(engine: AsyncEngine) -> None:
    # A refill of one token per 100 s: nothing refills while the test runs.
    app = build_app(engine, secure_settings(rate_limit_per_second=0.01, rate_limit_burst=2))
    acme, globex = await make_key(engine, "acme"), await make_key(engine, "globex")
    async with client_for(app, acme) as client:
        statuses = [(await call(client, "POST", SUBMIT, json=VALID)).status_code for _ in range(2)]
        limited = await call(client, "POST", SUBMIT, json=VALID)
        # Reads are not submissions: never rate limited.
        assert (await call(client, "GET", "/api/v1/blog/jobs")).status_code == 200
    assert statuses == [202, 202]
    assert limited.status_code == 429
    assert int(limited.headers["retry-after"]) >= 1
    assert limited.json()["retry_after"] == int(limited.headers["retry-after"])
    async with client_for(app, globex) as client:
        assert (await call(client, "POST", SUBMIT, json=VALID)).status_code == 202


async def test_in_flight_cap_is_per_tenant_and_frees_up(engine: AsyncEngine) -> None:
    app = build_app(engine, secure_settings(max_in_flight=2))
    acme, globex = await make_key(engine, "acme"), await make_key(engine, "globex")
    async with client_for(app, acme) as client:
        first = await call(client, "POST", SUBMIT, json=VALID)
        assert (await call(client, "POST", SUBMIT, json=VALID)).status_code == 202
        capped = await call(client, "POST", SUBMIT, json=VALID)
        assert capped.status_code == 429
        assert int(capped.headers["retry-after"]) >= 1
        assert "in flight" in capped.json()["detail"]
        async with engine.begin() as conn:
            await conn.execute(
                text("UPDATE jobs SET status = 'completed' WHERE id = :id"),
                {"id": first.json()["job_id"]},
            )
        assert (await call(client, "POST", SUBMIT, json=VALID)).status_code == 202
    async with client_for(app, globex) as client:
        assert (await call(client, "POST", SUBMIT, json=VALID)).status_code == 202


@pytest.fixture
async def client(engine: AsyncEngine) -> AsyncIterator[httpx.AsyncClient]:
    app = build_app(engine, secure_settings(max_body_bytes=4096, max_header_bytes=2048))
    async with client_for(app, await make_key(engine, "acme")) as c:
        yield c


async def job_count(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(text("SELECT count(*) FROM jobs"))).scalar_one())


async def test_oversized_bodies_get_413(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    big = orjson.dumps({**VALID, "custom_instructions": "x" * 5000})
    declared = await call(
        client, "POST", SUBMIT, content=big, headers={"Content-Type": "application/json"}
    )
    assert declared.status_code == 413

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it arrives
        for start in range(0, len(big), 1000):
            yield big[start : start + 1000]

    streamed = await call(
        client, "POST", SUBMIT, content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert streamed.status_code == 413
    assert "larger than 4096 bytes" in streamed.json()["detail"]
    assert await job_count(engine) == 0


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/jsonx",
    ],
)
async def test_non_json_bodies_get_415(
    client: httpx.AsyncClient, engine: AsyncEngine, content_type: str | None
) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    for url in (SUBMIT, "/api/v1/webhooks/deliveries/recover"):
        response = await call(client, "POST", url, content=orjson.dumps(VALID), headers=headers)
        assert response.status_code == 415, (url, response.text)
    assert await job_count(engine) == 0


async def test_json_with_charset_is_fine(client: httpx.AsyncClient) -> None:
    response = await call(
        client,
        "POST",
        SUBMIT,
        content=orjson.dumps(VALID),
        headers={"Content-Type": "application/json; charset=utf-8"},
    )
    assert response.status_code == 202


async def test_too_many_or_too_large_headers_get_431(client: httpx.AsyncClient) -> None:
    many = {f"x-filler-{i}": "1" for i in range(120)}
    assert (await call(client, "GET", "/api/v1/blog/jobs", headers=many)).status_code == 431
    large = {"x-filler": "y" * 3000}
    assert (await call(client, "GET", "/healthz", headers=large)).status_code == 431


def nested(depth: int) -> Any:
    value: Any = "leaf"
    for level in range(depth):
        value = {"k": value} if level % 2 else [value]
    return value


async def test_deep_json_gets_400(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    deep = await call(client, "POST", SUBMIT, json={**VALID, "metadata": {"x": nested(40)}})
    assert deep.status_code == 400
    assert "nested more than 32 levels" in deep.json()["detail"]
    fine = await call(client, "POST", SUBMIT, json={**VALID, "metadata": {"x": nested(20)}})
    assert fine.status_code == 202
    assert await job_count(engine) == 1


def test_json_depth_ignores_brackets_inside_strings() -> None:
    assert not json_too_deep(orjson.dumps({"a": "[[[[[[[[[[{{{{{{{{{{"}), 3)
    assert not json_too_deep(orjson.dumps({"a": '\\"[[[[[[[["'}), 3)
    assert json_too_deep(orjson.dumps(nested(5)), 4)
    assert not json_too_deep(orjson.dumps(nested(4)), 4)
    assert not json_too_deep(orjson.dumps([[1], [2], [3], [4], [5]]), 2)


def test_token_bucket_refills_at_the_rate() -> None:
    now = [100.0]
    buckets = TokenBuckets(rate=2.0, burst=3, now=lambda: now[0])
    assert [buckets.take("a") for _ in range(3)] == [None, None, None]
    assert buckets.take("a") == pytest.approx(0.5)
    assert buckets.take("b") is None  # per key
    now[0] += 0.5
    assert buckets.take("a") is None
    now[0] += 100
    assert [buckets.take("a") for _ in range(3)] == [None, None, None]  # capped at burst


def test_limit_settings() -> None:
    defaults = Settings.from_env({})
    assert (defaults.rate_limit_per_second, defaults.rate_limit_burst) == (10.0, 100)
    assert defaults.max_in_flight == 1000 and defaults.max_body_bytes == 65536
    assert defaults.cors_allowed_origins == ()
    custom = Settings.from_env(
        {
            "BLOGPIPE_RATE_LIMIT": "5:20",
            "BLOGPIPE_MAX_IN_FLIGHT": "3",
            "BLOGPIPE_MAX_BODY_BYTES": "131072",
            "CORS_ALLOWED_ORIGINS": "https://a.example, https://b.example",
        }
    )
    assert (custom.rate_limit_per_second, custom.rate_limit_burst) == (5.0, 20)
    assert custom.max_in_flight == 3 and custom.max_body_bytes == 131072
    assert custom.cors_allowed_origins == ("https://a.example", "https://b.example")
    assert Settings.from_env({"BLOGPIPE_RATE_LIMIT": "2"}).rate_limit_burst == 20
    assert Settings.from_env({"BLOGPIPE_RATE_LIMIT": "0"}).rate_limit_per_second == 0
    for bad in (
        {"BLOGPIPE_RATE_LIMIT": "fast"},
        {"BLOGPIPE_RATE_LIMIT": "-1"},
        {"BLOGPIPE_RATE_LIMIT": "5:0"},
        {"CORS_ALLOWED_ORIGINS": "*"},
    ):
        with pytest.raises(ConfigError):
            Settings.from_env(bad)


PREFLIGHT = {
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization, content-type",
}


async def test_cors_allows_nothing_by_default(engine: AsyncEngine) -> None:
    async with client_for(build_app(engine, secure_settings())) as client:
        preflight = await call(
            client, "OPTIONS", SUBMIT, headers={"Origin": "https://app.example", **PREFLIGHT}
        )
        simple = await call(client, "GET", "/healthz", headers={"Origin": "https://app.example"})
    assert preflight.status_code == 400
    assert "access-control-allow-origin" not in preflight.headers
    assert "access-control-allow-origin" not in simple.headers


async def test_cors_allows_listed_origins_only(engine: AsyncEngine) -> None:
    app = build_app(engine, secure_settings(cors_allowed_origins=("https://app.example",)))
    async with client_for(app) as client:
        ok = await call(
            client, "OPTIONS", SUBMIT, headers={"Origin": "https://app.example", **PREFLIGHT}
        )
        other = await call(
            client, "OPTIONS", SUBMIT, headers={"Origin": "https://evil.example", **PREFLIGHT}
        )
        # An unauthenticated call still carries CORS headers, so the page can read the 401.
        denied = await call(
            client, "GET", "/api/v1/blog/jobs", headers={"Origin": "https://app.example"}
        )
    assert ok.status_code == 200
    assert ok.headers["access-control-allow-origin"] == "https://app.example"
    assert "authorization" in ok.headers["access-control-allow-headers"].lower()
    assert "access-control-allow-credentials" not in ok.headers
    assert other.status_code == 400
    assert "access-control-allow-origin" not in other.headers
    assert denied.status_code == 401
    assert denied.headers["access-control-allow-origin"] == "https://app.example"
