"""Tenant isolation: two tenants x every job endpoint x own / other / missing id.

Another tenant's id answers exactly like a missing one, and nothing of the other
tenant's ever appears in a response body.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette
from starlette.routing import Route

from core.db.webhooks import DeliveryRepository, NewDelivery
from tests.support.apikeys import build_app, client_for, make_key, secure_settings

TIMEOUT = 10
SUBMIT = "/api/v1/blog/generate-enhanced?async_mode=true"


@dataclass
class Tenant:
    name: str
    key: str
    job_id: str
    topic: str
    delivery_id: str


async def call(client: httpx.AsyncClient, method: str, url: str, **kw: Any) -> httpx.Response:
    return await asyncio.wait_for(client.request(method, url, **kw), timeout=TIMEOUT)


async def onboard(engine: AsyncEngine, app: Starlette, name: str) -> Tenant:
    key = await make_key(engine, name)
    topic = f"Secret plans of {name} for next year"
    async with client_for(app, key) as client:
        response = await call(
            client,
            "POST",
            SUBMIT,
            json={"topic": topic, "keywords": [f"{name}-keyword"], "metadata": {"owner": name}},
        )
    assert response.status_code == 202, response.text
    job_id = response.json()["job_id"]
    delivery, _ = await DeliveryRepository(engine).create(
        NewDelivery(
            job_id=uuid.UUID(job_id),
            tenant=name,
            event_id=f"evt_{name}",
            event_type="job.completed",
            url=f"http://127.0.0.1:9/{name}",
            payload={"owner": name},
            occurred_at=datetime.now(UTC),
        )
    )
    return Tenant(name, key, job_id, topic, str(delivery.id))


@pytest.fixture
async def world(engine: AsyncEngine) -> tuple[Starlette, Tenant, Tenant]:
    app = build_app(engine, secure_settings())
    return app, await onboard(engine, app, "acme"), await onboard(engine, app, "globex")


# (method, url template, body, status for the tenant's own id)
ENDPOINTS: list[tuple[str, str, Any, int]] = [
    ("GET", "/api/v1/blog/jobs/{job}", None, 200),
    ("GET", "/api/v1/blog/jobs/{job}/deliveries", None, 200),
    ("POST", "/api/v1/webhooks/deliveries/{delivery}/redeliver", None, 202),
    ("POST", "/api/v1/blog/jobs/{job}/cancel", {}, 200),
    # A queued job has nothing to replay yet: 409 says the job was found.
    ("POST", "/api/v1/blog/jobs/{job}/replay", {"from_stage": "research"}, 409),
]


def has_route(app: Starlette, method: str, template: str) -> bool:
    path = template.replace("{job}", "{job_id}").replace("{delivery}", "{delivery_id}")
    return any(
        isinstance(r, Route) and r.path == path and method in (r.methods or ()) for r in app.routes
    )


@pytest.mark.parametrize(
    ("method", "template", "body", "own_status"),
    ENDPOINTS,
    ids=[f"{m} {t}" for m, t, _, _ in ENDPOINTS],
)
async def test_other_tenants_ids_are_missing(
    world: tuple[Starlette, Tenant, Tenant],
    method: str,
    template: str,
    body: Any,
    own_status: int,
) -> None:
    app, acme, globex = world
    if not has_route(app, method, template):
        pytest.skip(f"{method} {template} is not routed in this build")

    absent = str(uuid.uuid4())
    acmes = template.format(job=acme.job_id, delivery=acme.delivery_id)
    async with client_for(app, globex.key) as client:
        other = await call(client, method, acmes, json=body)
        missing = await call(
            client, method, template.format(job=absent, delivery=absent), json=body
        )
    assert other.status_code == missing.status_code == 404, other.text
    # Exactly like a missing one: same body but for the id asked about.
    for_other = other.text.replace(acme.job_id, "ID").replace(acme.delivery_id, "ID")
    assert for_other == missing.text.replace(absent, "ID")
    for leaked in (acme.topic, "acme-keyword", "acme"):
        assert leaked not in other.text

    async with client_for(app, acme.key) as client:
        own = await call(client, method, acmes, json=body)
    assert own.status_code == own_status, own.text
    assert globex.topic not in own.text and globex.job_id not in own.text


async def test_lists_hold_only_the_tenants_own_jobs(
    world: tuple[Starlette, Tenant, Tenant],
) -> None:
    app, acme, globex = world
    for me, them in ((acme, globex), (globex, acme)):
        async with client_for(app, me.key) as client:
            for status in (None, "queued"):
                params = {"status": status} if status else {}
                listing = await call(client, "GET", "/api/v1/blog/jobs", params=params)
                assert listing.status_code == 200
                assert [job["job_id"] for job in listing.json()["jobs"]] == [me.job_id]
                assert them.topic not in listing.text and them.job_id not in listing.text


async def test_recovery_and_endpoints_stay_within_the_tenant(
    world: tuple[Starlette, Tenant, Tenant],
    engine: AsyncEngine,
) -> None:
    app, acme, globex = world
    async with client_for(app, globex.key) as client:
        # Asking for another tenant's deliveries by parameter is ignored: a key is one tenant.
        recover = await call(
            client,
            "POST",
            "/api/v1/webhooks/deliveries/recover",
            json={"dry_run": True, "tenant": "acme", "since": "1d"},
        )
        assert recover.status_code == 200
        assert acme.delivery_id not in recover.text
        enabled = await call(
            client,
            "POST",
            "/api/v1/webhooks/endpoints/enable",
            json={"url": "http://127.0.0.1:9/acme", "tenant": "acme"},
        )
        assert enabled.status_code == 200 and enabled.json()["tenant"] == "globex"


async def test_operator_actions_are_audited(
    world: tuple[Starlette, Tenant, Tenant],
    engine: AsyncEngine,
) -> None:
    from core.db import audit

    app, acme, _ = world
    async with client_for(app, acme.key) as client:
        response = await call(
            client, "POST", f"/api/v1/webhooks/deliveries/{acme.delivery_id}/redeliver"
        )
    assert response.status_code == 202
    [entry, *_] = await audit.entries(engine, tenant="acme")
    assert entry.action == "webhook.redeliver" and entry.target == acme.delivery_id
    assert entry.key_id is not None and entry.actor == f"api-key:{entry.key_id}"
    assert entry.details["job_id"] == acme.job_id


async def test_batches_are_per_tenant(world: tuple[Starlette, Tenant, Tenant]) -> None:
    app, acme, globex = world
    async with client_for(app, acme.key) as client:
        created = await call(
            client,
            "POST",
            "/api/v1/blog/batch",
            json={"requests": [{"topic": acme.topic, "keywords": ["k"]}]},
        )
        assert created.status_code == 202, created.text
        batch_id = created.json()["batch_id"]
        assert (await call(client, "GET", f"/api/v1/blog/batches/{batch_id}")).status_code == 200
    absent = str(uuid.uuid4())
    async with client_for(app, globex.key) as client:
        other = await call(client, "GET", f"/api/v1/blog/batches/{batch_id}")
        missing = await call(client, "GET", f"/api/v1/blog/batches/{absent}")
        listing = await call(client, "GET", "/api/v1/blog/jobs")
    assert other.status_code == missing.status_code == 404
    assert other.text.replace(batch_id, "ID") == missing.text.replace(absent, "ID")
    assert acme.topic not in other.text + listing.text


async def test_replay_and_cancel_are_audited(
    world: tuple[Starlette, Tenant, Tenant],
    engine: AsyncEngine,
) -> None:
    from core.db import audit

    app, acme, _ = world
    async with client_for(app, acme.key) as client:
        cancelled = await call(client, "POST", f"/api/v1/blog/jobs/{acme.job_id}/cancel")
        replayed = await call(
            client,
            "POST",
            f"/api/v1/blog/jobs/{acme.job_id}/replay",
            json={"from_stage": "research", "reason": "audit test"},
        )
    assert cancelled.status_code == 200, cancelled.text
    assert replayed.status_code == 202, replayed.text
    entries = await audit.entries(engine, tenant="acme")
    actions = {entry.action: entry for entry in entries}
    assert {"job.cancel", "job.replay"} <= set(actions)
    assert actions["job.replay"].target == acme.job_id
    assert actions["job.replay"].actor.startswith("api-key:")
