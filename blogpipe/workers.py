"""``blogpipe dev --workers N`` and ``--replicas N``: more processes, more cores.

One Python process uses one core. With ``--workers N`` the ``dev`` process keeps the
API, the task queue and the sweeper, and N ``blogpipe worker`` processes (every stage
subscriber plus the notifier, sharing the subscriptions) do the pipeline's work — the
same split as deploying the API and the workers as separate Cloud Run services.

With ``--replicas N`` the ``dev`` process and N - 1 ``blogpipe serve --share-port``
children each run the whole pipeline (API, task queue, every stage, the notifier) on
one port: the kernel spreads connections over them (``SO_REUSEPORT``), a job submitted
to one replica is started and handed from stage to stage inside it (in memory, as in a
single process), and what one replica has no room for goes to the shared queues, where
any replica takes it. The same shape as several instances of one service.

The children get the settings ``dev`` resolved (the database URL of the embedded
server, the generated secrets), and are restarted if they die.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Sequence

from core.db.engine import plain_url
from core.settings import Settings

logger = logging.getLogger("blogpipe.workers")

RESTART_DELAY = 1.0
STOP_GRACE = 20.0
READY_WITHIN = 60.0
READY_FD = "BLOGPIPE_READY_FD"
"""Set in a child's environment: the pipe to write one byte to once it is serving."""


def signal_ready() -> None:
    """Tell the ``dev`` process that started this one that it is serving (if it asked)."""
    fd = os.environ.pop(READY_FD, None)
    if fd is None:
        return
    with contextlib.suppress(OSError, ValueError):
        os.write(int(fd), b"1")
        os.close(int(fd))


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


async def _read_one_byte(fd: int, within: float) -> bytes:
    """One byte from pipe ``fd`` (then closed); b"" at EOF (the writer exited) or after
    ``within`` seconds."""
    loop = asyncio.get_running_loop()
    got: asyncio.Future[bytes] = loop.create_future()

    def on_readable() -> None:
        if not got.done():
            try:
                got.set_result(os.read(fd, 1))
            except OSError:
                got.set_result(b"")

    loop.add_reader(fd, on_readable)
    try:
        return await asyncio.wait_for(got, within)
    except TimeoutError:
        return b""
    finally:
        loop.remove_reader(fd)
        os.close(fd)


class WorkerProcesses:
    """N ``blogpipe <command>`` children, restarted when they exit until ``stop``.

    ``start`` returns once every child has said it is serving (``signal_ready``)."""

    def __init__(
        self, count: int, env: dict[str, str], command: Sequence[str] = ("worker",)
    ) -> None:
        self.count = count
        self.env = env
        self.command = tuple(command)
        self.processes: list[asyncio.subprocess.Process | None] = [None] * count
        self._watchers: list[asyncio.Task[None]] = []
        self._stopping = False

    async def start(self) -> None:
        await asyncio.gather(*(self._spawn(index) for index in range(self.count)))
        for index in range(self.count):
            self._watchers.append(
                asyncio.create_task(self._watch(index), name=f"blogpipe-worker-{index}")
            )

    async def _spawn(self, index: int) -> None:
        """Start child ``index`` and wait until it serves (or exits, or ``READY_WITHIN``
        passes: then it is left to run, and its exit is handled by ``_watch``)."""
        readable, writable = os.pipe()
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "blogpipe",
                *self.command,
                env={**self.env, READY_FD: str(writable)},
                pass_fds=(writable,),
            )
        except BaseException:
            os.close(readable)
            raise
        finally:
            os.close(writable)
        self.processes[index] = process
        said = await _read_one_byte(readable, READY_WITHIN)
        logger.info(
            "Worker %d started (pid %d%s)",
            index,
            process.pid,
            "" if said else ", not ready yet",
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
