"""``blogpipe dev --workers N``: the stages and the notifier in N child processes.

One Python process uses one core. With ``--workers N`` the ``dev`` process keeps the
API, the task queue and the sweeper, and N ``blogpipe worker`` processes (every stage
subscriber plus the notifier, sharing the subscriptions) do the pipeline's work — the
same split as deploying the API and the workers as separate Cloud Run services. The
children get the settings ``dev`` resolved (the database URL of the embedded server,
the generated secrets), and are restarted if they die.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys

from core.db.engine import plain_url
from core.settings import Settings

logger = logging.getLogger("blogpipe.workers")

RESTART_DELAY = 1.0
STOP_GRACE = 20.0


def worker_env(settings: Settings, database_url: str) -> dict[str, str]:
    """The environment of a ``blogpipe worker`` child: this process's, plus what ``dev``
    resolved for itself (so both sides use the same database and secrets)."""
    env = dict(os.environ)
    env.update(
        DATABASE_URL=plain_url(database_url),
        WEBHOOK_SECRET=settings.webhook_secret or "",
        WORKER_SHARED_SECRET=settings.worker_shared_secret or "",
        WEBHOOK_ALLOWED_HOSTS=",".join(settings.webhook_allowed_hosts),
        WEBHOOK_ALLOW_HTTP="true" if settings.webhook_allow_http else "false",
    )
    return env


class WorkerProcesses:
    """N ``blogpipe worker`` children, restarted when they exit until ``stop``."""

    def __init__(self, count: int, env: dict[str, str]) -> None:
        self.count = count
        self.env = env
        self.processes: list[asyncio.subprocess.Process | None] = [None] * count
        self._watchers: list[asyncio.Task[None]] = []
        self._stopping = False

    async def start(self) -> None:
        for index in range(self.count):
            await self._spawn(index)
            self._watchers.append(
                asyncio.create_task(self._watch(index), name=f"blogpipe-worker-{index}")
            )

    async def _spawn(self, index: int) -> None:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "blogpipe", "worker", env=self.env
        )
        self.processes[index] = process
        logger.info(
            "Worker %d started (pid %d)",
            index,
            process.pid,
            extra={"action": "worker_started", "pid": process.pid},
        )

    async def _watch(self, index: int) -> None:
        while not self._stopping:
            process = self.processes[index]
            assert process is not None
            code = await process.wait()
            if self._stopping:
                return
            logger.error(
                "Worker %d (pid %d) exited with %s; restarting in %.0fs",
                index,
                process.pid,
                code,
                RESTART_DELAY,
                extra={"action": "worker_exited", "pid": process.pid, "code": code},
            )
            await asyncio.sleep(RESTART_DELAY)
            if not self._stopping:
                await self._spawn(index)

    async def stop(self) -> None:
        """SIGTERM every child (each drains its in-flight messages), then wait; SIGKILL
        whatever is still running after ``STOP_GRACE`` seconds."""
        self._stopping = True
        for watcher in self._watchers:
            watcher.cancel()
        running = [p for p in self.processes if p is not None and p.returncode is None]
        for process in running:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        for process in running:
            try:
                await asyncio.wait_for(process.wait(), STOP_GRACE)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
