"""Property-based fuzzing of every documented operation against a live server.

Schemathesis generates requests from ``/openapi.json``; every response must be a non-5xx
with a documented status code, content type, headers and body schema. ``make test`` runs
a bounded number of examples per operation; ``make fuzz`` sets BLOGPIPE_FUZZ_EXAMPLES
(and BLOGPIPE_FUZZ_MODES=all to add invalid inputs) for a longer run.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest
import uvicorn

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from api.openapi import openapi_document  # noqa: E402
from core.db.apikeys import SCOPES, ApiKeyRepository  # noqa: E402
from core.db.engine import create_engine  # noqa: E402
from tests.support.apikeys import build_app, secure_settings  # noqa: E402
from tests.support.database import DatabaseFactory  # noqa: E402
from tests.support.net import free_port  # noqa: E402
from tests.support.waiting import wait_for  # noqa: E402

EXAMPLES = int(os.environ.get("BLOGPIPE_FUZZ_EXAMPLES", "15"))
MODES = os.environ.get("BLOGPIPE_FUZZ_MODES", "positive")
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]

config = schemathesis.config.SchemathesisConfig.from_dict({"generation": {"mode": MODES}})
# Ping is left out: it connects to the URL it is given, and generated URLs may name hosts
# beyond this machine. tests/integration/test_notifier_operations.py covers it.
schema = schemathesis.openapi.from_dict(openapi_document(), config=config).exclude(
    path="/api/v1/webhooks/ping"
)


@dataclass
class LiveServer:
    """The API (API-key mode) served by uvicorn on its own thread and event loop."""

    database_url: str
    port: int = 0
    key: str = ""
    error: BaseException | None = None

    def __post_init__(self) -> None:
        self.port = free_port()
        self.ready = threading.Event()
        self.server: uvicorn.Server | None = None
        self.thread = threading.Thread(target=self._run, name="fuzz-api", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # surfaced by start()
            self.error = exc
            self.ready.set()

    async def _serve(self) -> None:
        engine = create_engine(self.database_url, pool_size=5)
        try:
            _, self.key = await ApiKeyRepository(engine).create("fuzz", SCOPES)
            app = build_app(engine, secure_settings())
            config = uvicorn.Config(
                app,
                host="127.0.0.1",
                port=self.port,
                lifespan="off",
                log_level="warning",
                access_log=False,
            )
            self.server = uvicorn.Server(config)
            serving = asyncio.ensure_future(self.server.serve())
            server = self.server

            async def started() -> bool:
                return server.started or serving.done()

            await wait_for(started, timeout=30, interval=0.02, message="the fuzz server")
            self.ready.set()
            await serving
        finally:
            await engine.dispose()

    def start(self) -> None:
        self.thread.start()
        if not self.ready.wait(timeout=60) or self.error is not None:
            raise RuntimeError(f"the fuzz server did not start: {self.error!r}")

    def stop(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
async def fuzz_database(database_factory: DatabaseFactory) -> AsyncIterator[str]:
    from core.db.engine import asyncpg_url

    url = await database_factory.create()
    yield asyncpg_url(url)
    await database_factory.drop(url)


@pytest.fixture(scope="module")
def live_server(fuzz_database: str) -> Iterator[LiveServer]:
    server = LiveServer(fuzz_database)
    server.start()
    yield server
    server.stop()


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
        HealthCheck.function_scoped_fixture,
    ],
)
def test_api_conforms_to_its_schema(case: schemathesis.Case, live_server: LiveServer) -> None:
    case.call_and_validate(
        base_url=live_server.url,
        headers={"Authorization": f"Bearer {live_server.key}"},
        checks=CHECKS,
        timeout=30,
    )
