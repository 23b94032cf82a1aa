"""The seed-compatible HTTP API over a real database: contract fields, errors, nothing
written on bad input."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any
from uuid import UUID

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from api.app import create_app
from api.caller_auth import worker_authorizer
from api.deps import ApiDeps
from core.broker.postgres import PostgresBroker
from core.db.engine import create_engine
from core.db.jobs import JobRepository
from core.db.pipeline import PipelineStore
from core.dispatch import Dispatcher
from core.requests import BlogRequest
from core.settings import Settings

SECRET = "test-worker-secret"
VALID = {"topic": "Best presents for teenagers", "keywords": ["gifts for teens"]}


class RecordingQueue:
    """A task queue that records what it was asked to enqueue."""

    def __init__(self) -> None:
        self.enqueued: list[UUID] = []

    async def enqueue(self, job_id: UUID, request: dict[str, Any]) -> None:
        self.enqueued.append(job_id)


@pytest.fixture
def queue() -> RecordingQueue:
    return RecordingQueue()


def api_client(
    engine: AsyncEngine, queue: RecordingQueue, *, raise_app_exceptions: bool = True
) -> httpx.AsyncClient:
    settings = Settings(worker_shared_secret=SECRET, auth="none")
    store = PipelineStore(engine, Dispatcher(engine, PostgresBroker(engine)))

    async def inline(request: BlogRequest) -> dict[str, Any]:
        return {"title": request.topic, "success": True}

    deps = ApiDeps(
        settings=settings,
        engine=engine,
        jobs=JobRepository(engine),
        store=store,
        task_queue=queue,
        worker_auth=worker_authorizer(settings),
        run_inline=inline,
    )
    transport = httpx.ASGITransport(app=create_app(deps), raise_app_exceptions=raise_app_exceptions)
    return httpx.AsyncClient(transport=transport, base_url="http://test", timeout=10)


@pytest.fixture
async def client(engine: AsyncEngine, queue: RecordingQueue) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(engine, queue) as c:
        yield c


async def job_count(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(text("SELECT count(*) FROM jobs"))).scalar_one())


async def test_async_submit_returns_contract_fields(
    client: httpx.AsyncClient, queue: RecordingQueue
) -> None:
    response = await client.post("/api/v1/blog/generate-enhanced?async_mode=true", json=VALID)
    assert response.status_code == 202
    body = response.json()
    assert body["status"] == "queued"
    assert body["message"] == "Blog generation job queued successfully"
    assert body["estimated_completion_time"] == 240
    assert queue.enqueued == [UUID(body["job_id"])]

    status = (await client.get(f"/api/v1/blog/jobs/{body['job_id']}")).json()
    assert status["job_id"] == body["job_id"]
    assert status["status"] == "queued"
    assert status["progress_percentage"] == 0
    assert status["result"] is None and status["error_message"] is None
    assert status["created_at"].endswith("+00:00")
    assert status["progress_updates"] == []
    assert [stage["stage"] for stage in status["stages"]] == ["research", "outline", "draft", "seo"]


async def test_sync_mode_returns_result_object(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    response = await client.post("/api/v1/blog/generate-enhanced", json=VALID)
    assert response.status_code == 200
    assert response.json() == {"title": VALID["topic"], "success": True}
    assert await job_count(engine) == 0


async def test_request_defaults_are_the_seeds(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    response = await client.post("/api/v1/blog/generate-enhanced?async_mode=true", json=VALID)
    async with engine.connect() as conn:
        stored = (
            await conn.execute(
                text("SELECT request FROM jobs WHERE id = :id"),
                {"id": UUID(response.json()["job_id"])},
            )
        ).scalar_one()
    assert stored["tone"] == "professional" and stored["length"] == "medium"
    assert stored["use_google_search"] is True and stored["use_consensus_generation"] is False
    assert stored["include_prices"] is False and stored["include_faq_section"] is True
    assert stored["research_depth"] == "standard"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"keywords": ["x"]}, "topic"),
        ({"topic": "ab", "keywords": ["x"]}, "topic"),
        ({"topic": "a" * 201, "keywords": ["x"]}, "topic"),
        ({"topic": "A fine topic", "keywords": []}, "keywords"),
        ({"topic": "A fine topic"}, "keywords"),
        ({"topic": "A fine topic", "keywords": ["x"], "tone": "sarcastic"}, "tone"),
        ({"topic": "A fine topic", "keywords": ["x"], "length": "huge"}, "length"),
        ({"topic": "A fine topic", "keywords": ["x"] * 21}, "keywords"),
        (
            {"topic": "A fine topic", "keywords": ["x"], "custom_instructions": "y" * 2001},
            "custom_instructions",
        ),
        ({"topic": "A fine topic", "keywords": ["x"], "callback_url": "ftp://x"}, "callback_url"),
        ({"topic": "A fine topic", "keywords": ["x"], "research_depth": "deep"}, "research_depth"),
    ],
)
async def test_invalid_requests_name_the_field(
    client: httpx.AsyncClient,
    engine: AsyncEngine,
    queue: RecordingQueue,
    body: dict[str, Any],
    field: str,
) -> None:
    for mode in ("true", "false"):
        response = await client.post(f"/api/v1/blog/generate-enhanced?async_mode={mode}", json=body)
        assert response.status_code == 422, response.text
        payload = response.json()
        assert any(error["loc"][:2] == ["body", field] for error in payload["detail"])
        assert field in payload["message"]
    assert await job_count(engine) == 0
    assert queue.enqueued == []


async def test_malformed_json_is_400(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    response = await client.post(
        "/api/v1/blog/generate-enhanced?async_mode=true",
        content=b'{"topic": "abc", ',
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 400
    assert "not valid JSON" in response.json()["detail"]
    assert await job_count(engine) == 0


async def test_non_json_body_is_415(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    response = await client.post(
        "/api/v1/blog/generate-enhanced?async_mode=true",
        content=b"topic=abc",
        headers={"content-type": "text/plain"},
    )
    assert response.status_code == 415
    assert "application/json" in response.json()["detail"]
    assert await job_count(engine) == 0


async def test_json_that_is_not_an_object_is_422(client: httpx.AsyncClient) -> None:
    response = await client.post("/api/v1/blog/generate-enhanced?async_mode=true", json=[1, 2])
    assert response.status_code == 422


async def test_bad_async_mode_value_is_422(client: httpx.AsyncClient) -> None:
    response = await client.post("/api/v1/blog/generate-enhanced?async_mode=maybe", json=VALID)
    assert response.status_code == 422
    assert "async_mode" in response.json()["detail"]


async def test_oversized_body_is_413(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    body = {**VALID, "metadata": {"blob": "x" * 70_000}}
    response = await client.post("/api/v1/blog/generate-enhanced?async_mode=true", json=body)
    assert response.status_code == 413
    assert await job_count(engine) == 0


@pytest.mark.parametrize("job_id", [str(uuid.uuid4()), "not-a-uuid"])
async def test_unknown_job_is_404_with_seed_text(client: httpx.AsyncClient, job_id: str) -> None:
    response = await client.get(f"/api/v1/blog/jobs/{job_id}")
    assert response.status_code == 404
    assert response.json() == {"detail": f"Job {job_id} not found"}


async def test_worker_rejects_missing_and_wrong_credentials(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    created = await client.post("/api/v1/blog/generate-enhanced?async_mode=true", json=VALID)
    job_id = created.json()["job_id"]
    missing = await client.post("/api/v1/blog/worker", json={"job_id": job_id})
    assert missing.status_code == 401
    assert "error" in missing.json()
    wrong = await client.post(
        "/api/v1/blog/worker", json={"job_id": job_id}, headers={"X-Worker-Secret": "nope"}
    )
    assert wrong.status_code == 403
    status = (await client.get(f"/api/v1/blog/jobs/{job_id}")).json()
    assert status["status"] == "queued"


async def test_worker_errors_follow_the_contract(client: httpx.AsyncClient) -> None:
    headers = {"X-Worker-Secret": SECRET}
    no_id = await client.post("/api/v1/blog/worker", json={"request": {}}, headers=headers)
    assert no_id.status_code == 400
    assert no_id.json() == {"error": "job_id is required"}
    unknown = str(uuid.uuid4())
    missing = await client.post("/api/v1/blog/worker", json={"job_id": unknown}, headers=headers)
    assert missing.status_code == 404
    assert missing.json() == {"error": f"Job {unknown} not found"}


async def test_worker_starts_a_job_once(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    created = await client.post("/api/v1/blog/generate-enhanced?async_mode=true", json=VALID)
    job_id = created.json()["job_id"]
    headers = {"X-Worker-Secret": SECRET}
    first = await client.post("/api/v1/blog/worker", json={"job_id": job_id}, headers=headers)
    second = await client.post("/api/v1/blog/worker", json={"job_id": job_id}, headers=headers)
    assert first.json()["outcome"] == "started"
    assert second.json()["outcome"] == "already_started"
    status = (await client.get(f"/api/v1/blog/jobs/{job_id}")).json()
    assert status["status"] == "processing" and status["started_at"] is not None


async def test_job_list_paginates_with_a_cursor(client: httpx.AsyncClient) -> None:
    ids = []
    for index in range(5):
        body = {**VALID, "topic": f"Topic number {index}"}
        ids.append(
            (await client.post("/api/v1/blog/generate-enhanced?async_mode=true", json=body)).json()[
                "job_id"
            ]
        )
    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": "2", **({"cursor": cursor} if cursor else {})}
        page = (await client.get("/api/v1/blog/jobs", params=params)).json()
        seen.extend(job["job_id"] for job in page["jobs"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(ids))
    filtered = (await client.get("/api/v1/blog/jobs", params={"status": "completed"})).json()
    assert filtered["jobs"] == []
    bad = await client.get("/api/v1/blog/jobs", params={"status": "bogus"})
    assert bad.status_code == 422
    bad_cursor = await client.get("/api/v1/blog/jobs", params={"cursor": "garbage"})
    assert bad_cursor.status_code == 422


async def test_health_and_openapi(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = await client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"]["database"] == "ok"
    spec = (await client.get("/openapi.json")).json()
    assert "/api/v1/blog/generate-enhanced" in spec["paths"]
    assert "BlogRequest" in spec["components"]["schemas"]


@pytest.mark.parametrize(
    "url",
    [
        "https://127.0.0.1/hook",
        "https://10.1.2.3/hook",
        "https://169.254.169.254/latest/meta-data",
        "https://[::1]/hook",
        "https://localhost/hook",
        "http://93.184.216.34/hook",
    ],
)
async def test_callback_urls_into_our_network_are_refused(
    client: httpx.AsyncClient, engine: AsyncEngine, url: str
) -> None:
    response = await client.post(
        "/api/v1/blog/generate-enhanced?async_mode=true", json={**VALID, "callback_url": url}
    )
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["body", "callback_url"]
    assert "callback_url" in response.json()["message"]
    assert await job_count(engine) == 0


async def test_public_https_callback_is_accepted(client: httpx.AsyncClient) -> None:
    body = {**VALID, "callback_url": "https://93.184.216.34/hook"}
    response = await client.post("/api/v1/blog/generate-enhanced?async_mode=true", json=body)
    assert response.status_code == 202, response.text


async def test_an_unreachable_database_is_a_503_to_retry(queue: RecordingQueue) -> None:
    unreachable = create_engine("postgresql+asyncpg://postgres@127.0.0.1:1/none", pool_size=1)
    try:
        async with api_client(unreachable, queue) as down:
            for response in (
                await down.get(f"/api/v1/blog/jobs/{uuid.uuid4()}"),
                await down.get("/api/v1/blog/jobs"),
                await down.post("/api/v1/blog/generate-enhanced?async_mode=true", json=VALID),
            ):
                assert response.status_code == 503, response.text
                assert response.headers["retry-after"] == "1"
                assert "database could not be reached" in response.json()["detail"]
    finally:
        await unreachable.dispose()
    assert queue.enqueued == []


async def test_a_statement_error_stays_a_500(engine: AsyncEngine, queue: RecordingQueue) -> None:
    async with engine.begin() as conn:
        await conn.execute(text("ALTER TABLE jobs RENAME COLUMN metadata TO metadata_gone"))
    async with api_client(engine, queue, raise_app_exceptions=False) as client:
        response = await client.get("/api/v1/blog/jobs")
    assert response.status_code == 500
    assert response.json() == {"detail": "Internal server error"}
