"""Composition: build the adapters settings select, and run each deployable."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette
from starlette.routing import BaseRoute

from api.app import create_app
from api.caller_auth import push_authorizer, worker_authorizer
from api.deps import ApiDeps
from api.push import push_route
from core.broker import Broker, Handler
from core.broker.provision import provision
from core.constants import (
    STAGES,
    dead_letter_subscription,
    stage_subscription,
    stage_topic,
)
from core.db.engine import create_engine, resolve_database_url
from core.db.jobs import JobRepository
from core.db.pipeline import PipelineStore
from core.dispatch import Dispatcher
from core.errors import ConfigError
from core.llm import LLM
from core.llm.factory import build_llm
from core.requests import BlogRequest
from core.settings import Settings
from core.taskqueue import TaskQueue, build_task_queue
from stages.base import warm
from stages.inline import run_inline
from stages.registry import get_stage
from stages.runner import StageRunner

logger = logging.getLogger("blogpipe")


START_ROOM_WAIT = 10.0
"""Longest a job waits in the in-process task queue for room in the first stage here:
after it, the job starts anyway and its message waits in the shared queue, where any
process's consumer takes it (another replica may have room)."""


def build_broker(settings: Settings, engine: AsyncEngine) -> Broker:
    """The broker ``BLOGPIPE_BROKER`` selects."""
    if settings.broker == "pubsub":
        from core.broker.pubsub import PubSubBroker

        return PubSubBroker(
            settings.google_cloud_project,
            emulator_host=settings.pubsub_emulator_host,
            max_in_flight_default=settings.pubsub_max_messages,
            lease_extension_seconds=settings.ack_deadline_seconds,
        )
    from core.broker.postgres import PostgresBroker

    return PostgresBroker(engine)


@dataclass
class Runtime:
    """Open connections and adapters shared by the deployables of one process."""

    settings: Settings
    engine: AsyncEngine
    broker: Broker
    dispatcher: Dispatcher
    store: PipelineStore
    jobs: JobRepository
    llm: LLM
    task_queue: TaskQueue
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)

    @classmethod
    async def open(cls, settings: Settings, *, migrate: bool = False) -> Runtime:
        url = resolve_database_url(settings)
        engine = create_engine(url, pool_size=settings.db_pool_size)
        if migrate:
            from core.db.migrate import upgrade_unless_current

            await upgrade_unless_current(engine)
        broker = build_broker(settings, engine)
        dispatcher = Dispatcher(engine, broker)
        store = PipelineStore(engine, dispatcher, lease_seconds=settings.stage_lease_seconds)

        first_topic = stage_topic(STAGES[0])

        async def start_job(job_id: UUID) -> None:
            # The in-process task queue starts a job once the first stage has room here
            # (or after START_ROOM_WAIT): a burst of submissions then flows through the
            # stages in memory instead of overflowing into rows that are leased later.
            # Until then the job is stored as queued, as it would be in Cloud Tasks.
            room: contextlib.AbstractAsyncContextManager[None] = contextlib.nullcontext()
            if settings.task_queue == "local":
                room = dispatcher.room_for(first_topic, START_ROOM_WAIT)
            async with room:
                await store.start_job(job_id)

        return cls(
            settings=settings,
            engine=engine,
            broker=broker,
            dispatcher=dispatcher,
            store=store,
            jobs=JobRepository(engine),
            llm=build_llm(settings),
            task_queue=build_task_queue(settings, start_job=start_job),
        )

    async def provision(self, *, push_endpoint: str | None = None) -> list[str]:
        """Create topics, subscriptions (retry and dead-letter policies) and the task queue."""
        s = self.settings
        done = await provision(
            self.broker,
            max_delivery_attempts=s.max_delivery_attempts,
            ack_deadline_seconds=s.ack_deadline_seconds,
            min_backoff=s.min_backoff_seconds,
            max_backoff=s.max_backoff_seconds,
            push_endpoint=push_endpoint,
        )
        await self.task_queue.ensure_queue()
        return [
            *(str(item) for item in done),
            f"task queue {s.task_queue}:{s.cloud_tasks_queue_name}",
        ]

    def spawn(self, coro: Awaitable[Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self.tasks.append(task)
        return task

    def stage_runner(self, stage: str) -> StageRunner:
        return StageRunner(get_stage(stage), self.store, self.llm, self.settings)

    def start_stage(self, stage: str) -> None:
        """Load what the stage loads once, then subscribe it and its dead-letter consumer."""
        runner = self.stage_runner(stage)
        warm(runner.stage)
        limit = self.settings.pubsub_max_messages
        self.spawn(
            self.broker.subscribe(stage_subscription(stage), runner.handle, max_in_flight=limit),
            f"stage-{stage}",
        )
        self.spawn(
            self.broker.subscribe(
                dead_letter_subscription(stage_topic(stage)),
                runner.handle_dead_letter,
                max_in_flight=10,
            ),
            f"dead-letter-{stage}",
        )

    def start_notifier(self) -> None:
        from notifier.service import Notifier

        notifier = Notifier(self.engine, self.broker, self.settings)
        self.spawn(notifier.run(), "notifier")

    def start_relay(self) -> None:
        self.spawn(self.dispatcher.run_relay(), "outbox-relay")

    def start_sweeper(self) -> None:
        """Stuck-job detection and retention (JOB_RETENTION_HOURS, BLOGPIPE_STUCK_AFTER)."""
        from core.db.sweeper import Sweeper

        s = self.settings
        requeue = self.task_queue.enqueue if s.task_queue == "local" else None
        sweeper = Sweeper(
            self.store,
            stuck_after=s.stuck_after_seconds,
            retention_hours=s.job_retention_hours,
            max_redrives=s.max_redrives,
            requeue=requeue,
        )
        self.spawn(sweeper.run_forever(interval=s.sweep_interval_seconds), "sweeper")

    async def requeue_waiting_jobs(self) -> int:
        """Hand queued jobs to the task queue again (a restart lost the in-process queue)."""
        async with self.engine.connect() as conn:
            rows = (
                await conn.execute(
                    text(
                        "SELECT id, request FROM jobs WHERE status IN ('queued', 'pending')"
                        " ORDER BY created_at"
                    )
                )
            ).all()
        for row in rows:
            await self.task_queue.enqueue(row.id, dict(row.request))
        if rows:
            logger.info("Re-queued %d waiting job(s)", len(rows), extra={"action": "jobs_requeued"})
        return len(rows)

    def app(self) -> Starlette:
        """The API app with the push endpoints of every stage and the notifier."""
        handlers: dict[str, Handler] = {}
        for stage in STAGES:
            runner = self.stage_runner(stage)
            handlers[stage_subscription(stage)] = runner.handle
            handlers[dead_letter_subscription(stage_topic(stage))] = runner.handle_dead_letter
        routes: list[BaseRoute] = [push_route(handlers, push_authorizer(self.settings))]
        from api.operations import routes as operation_routes

        routes.extend(operation_routes)
        with contextlib.suppress(ImportError):
            from api.webhooks import webhook_routes

            routes.extend(webhook_routes(self.engine, self.settings))

        async def inline(request: BlogRequest) -> dict[str, Any]:
            return await run_inline(request, self.llm, self.settings)

        deps = ApiDeps(
            settings=self.settings,
            engine=self.engine,
            jobs=self.jobs,
            store=self.store,
            task_queue=self.task_queue,
            worker_auth=worker_authorizer(self.settings),
            run_inline=inline,
            extra_routes=routes,
        )
        return create_app(deps)

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.tasks.clear()
        with contextlib.suppress(Exception):
            await self.task_queue.close()
        with contextlib.suppress(Exception):
            await self.broker.close()
        with contextlib.suppress(Exception):
            await self.llm.close()
        await self.engine.dispose()


def api_socket(host: str, port: int, *, shared: bool = False) -> socket.socket:
    """The API's socket, bound to ``host:port`` but not yet listening (the server listens
    when it serves; until then a client is refused, not kept waiting).

    Bound before anything else starts, so a port in use (or a host that is not this
    machine's) is a ``ConfigError`` naming the setting at once, not a traceback from
    the server after the database and the stages are up. ``shared``: other processes
    may bind it too (``SO_REUSEPORT``), and the kernel spreads new connections over
    all of them."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise _cannot_listen(host, port, exc) from exc
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if shared:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise _cannot_listen(host, port, exc) from exc
    sock.setblocking(False)
    return sock


def _cannot_listen(host: str, port: int, exc: OSError) -> ConfigError:
    reason = exc.strerror or str(exc)
    return ConfigError(
        f"cannot listen on {host}:{port} ({reason}): set PORT (or HOST) to a free address"
    )


async def serve(
    app: Starlette,
    listening: socket.socket,
    *,
    ready: Callable[[], None] | None = None,
) -> None:
    """Serve ``app`` with uvicorn inside the running loop until cancelled, on
    ``listening`` (``api_socket``: bound before start-up, shared with other ``blogpipe``
    processes under ``blogpipe dev --replicas``)."""
    import uvicorn

    host, port = listening.getsockname()[:2]
    config = uvicorn.Config(
        app, host=host, port=port, log_level="warning", lifespan="off", access_log=False
    )
    server = uvicorn.Server(config)
    task = asyncio.ensure_future(server.serve(sockets=[listening]))
    try:
        while not server.started:
            if task.done():
                await task
                raise RuntimeError(f"the API server did not start on {host}:{port}")
            await asyncio.sleep(0.02)
        if ready:
            ready()
        # Shielded: cancelling us must stop the server gracefully (closing its sockets),
        # not cancel it mid-flight.
        await asyncio.shield(task)
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(task), timeout=5)


COMPONENTS: Sequence[str] = ("api", *STAGES, "notifier")


class Pipeline:
    """The whole pipeline in one process (``blogpipe dev``), startable and stoppable."""

    def __init__(
        self,
        settings: Settings,
        components: Sequence[str] = COMPONENTS,
        *,
        setup: bool = True,
        share_port: bool = False,
    ) -> None:
        self.settings = settings
        self.components = components
        self.share_port = share_port
        # ``blogpipe dev`` migrates and provisions itself; deployed services leave that to
        # ``blogpipe init`` so they need no admin rights on Pub/Sub or the schema.
        self.setup = setup
        self.runtime: Runtime | None = None
        self._started = asyncio.Event()

    @property
    def url(self) -> str:
        return f"http://{self.settings.host}:{self.settings.port}"

    async def start(
        self, before_serving: Callable[[Runtime], Awaitable[object]] | None = None
    ) -> Runtime:
        """Open the runtime, set up (``dev``), start the components; ``before_serving``
        runs just before the API starts serving (``dev`` starts its children there, so
        that answering ``/readyz`` means every process is up).

        On a shared port this process listens before ``before_serving``: the kernel
        spreads connections over the sockets listening when they arrive, and a client
        may connect as soon as a replica answers ``/readyz``, before this process serves
        (its connections wait in its backlog until then). Listening only when serving,
        it missed every connection a client opened in that moment: one replica did all
        the work while the other idled. The socket is bound before anything else, so a
        port in use fails start-up at once (``ConfigError``)."""
        listening = None
        if "api" in self.components:
            listening = api_socket(self.settings.host, self.settings.port, shared=self.share_port)
        try:
            runtime = await Runtime.open(self.settings, migrate=self.setup)
            self.runtime = runtime
            if self.setup:
                await runtime.provision()
            if self.share_port and listening is not None:
                listening.listen(2048)
            if before_serving is not None:
                await before_serving(runtime)
            for stage in STAGES:
                if stage in self.components:
                    runtime.start_stage(stage)
            if "notifier" in self.components:
                runtime.start_notifier()
            runtime.start_relay()
            if "api" in self.components:
                runtime.start_sweeper()
        except BaseException:
            if listening is not None:
                listening.close()
            raise
        if listening is not None:
            runtime.spawn(
                serve(runtime.app(), listening, ready=self._started.set),
                "api",
            )
            await asyncio.wait_for(self._wait_started(), timeout=30)
        if self.settings.task_queue == "local" and "api" in self.components:
            await runtime.requeue_waiting_jobs()
        return runtime

    async def _wait_started(self) -> None:
        assert self.runtime is not None
        api_task = next(task for task in self.runtime.tasks if task.get_name() == "api")
        waiter = asyncio.ensure_future(self._started.wait())
        done, _ = await asyncio.wait({waiter, api_task}, return_when=asyncio.FIRST_COMPLETED)
        if api_task in done:
            waiter.cancel()
            await api_task  # re-raises why the server stopped

    async def stop(self) -> None:
        if self.runtime is not None:
            await self.runtime.close()
            self.runtime = None
