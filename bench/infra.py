"""What every scenario stands on: the database server, fresh databases, child processes
(with their peak RSS), and the facts about the machine that go into the results."""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import psutil

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = REPO / ".blogpipe" / "bench"  # .blogpipe/ is git-ignored
WEBHOOK_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


class BenchError(RuntimeError):
    """A scenario could not run (missing dependency, process died, timeout)."""


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def with_database(url: str, name: str) -> str:
    """The same server URL pointing at database ``name``."""
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


def server_url() -> str:
    """``DATABASE_URL`` when set, else the embedded PostgreSQL under ``.blogpipe/bench``."""
    url = os.environ.get("DATABASE_URL")
    if not url:
        from core.db.engine import start_embedded_postgres

        url = start_embedded_postgres(DATA_DIR)
    parts = urlsplit(url)
    return urlunsplit(parts._replace(scheme="postgresql"))


class Databases:
    """Fresh databases for each run, cloned from one migrated template."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.template = f"bench_tpl_{uuid.uuid4().hex[:8]}"
        self.created: list[str] = []

    async def _admin(self) -> asyncpg.Connection:
        return await asyncio.wait_for(asyncpg.connect(with_database(self.url, "postgres")), 30)

    async def prepare(self) -> None:
        from core.db.engine import asyncpg_url, create_engine
        from core.db.migrate import upgrade

        conn = await self._admin()
        try:
            await conn.execute(f'CREATE DATABASE "{self.template}"')
        finally:
            await conn.close()
        engine = create_engine(asyncpg_url(with_database(self.url, self.template)), pool_size=1)
        try:
            await asyncio.wait_for(upgrade(engine), 120)
        finally:
            await engine.dispose()

    async def fresh(self, *, migrated: bool = True) -> str:
        """A new database (with blogpipe's schema unless ``migrated`` is False); its URL."""
        name = f"bench_{uuid.uuid4().hex[:10]}"
        conn = await self._admin()
        try:
            template = f' TEMPLATE "{self.template}"' if migrated else ""
            await conn.execute(f'CREATE DATABASE "{name}"{template}')
        finally:
            await conn.close()
        self.created.append(name)
        return with_database(self.url, name)

    async def drop(self, url: str) -> None:
        name = urlsplit(url).path.lstrip("/")
        conn = await self._admin()
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()
        with contextlib.suppress(ValueError):
            self.created.remove(name)

    async def close(self) -> None:
        conn = await self._admin()
        try:
            for name in [*self.created, self.template]:
                await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


class Child:
    """A child process in its own session, with a peak-RSS sampler over it and its children."""

    def __init__(
        self, argv: Sequence[str], env: Mapping[str, str], log_path: Path, *, name: str
    ) -> None:
        self.name = name
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            self.process = subprocess.Popen(
                list(argv),
                cwd=REPO,
                env={**os.environ, **env},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.peak_rss = 0
        self._sampler: asyncio.Task[None] | None = None

    def rss(self) -> int:
        """Resident memory of the process and all its descendants, in bytes."""
        try:
            root = psutil.Process(self.process.pid)
            total = root.memory_info().rss
            for child in root.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    total += child.memory_info().rss
            return int(total)
        except psutil.Error:
            return 0

    def cpu_seconds(self) -> float:
        """User and system CPU time of the process and its live descendants, in seconds."""
        total = 0.0
        try:
            root = psutil.Process(self.process.pid)
            family = [root, *root.children(recursive=True)]
        except psutil.Error:
            return total
        for process in family:
            with contextlib.suppress(psutil.Error):
                total += process_cpu_seconds(process)
        return total

    def start_sampling(self, interval: float = 0.1) -> None:
        async def sample() -> None:
            while True:
                self.peak_rss = max(self.peak_rss, self.rss())
                await asyncio.sleep(interval)

        self._sampler = asyncio.create_task(sample(), name=f"rss-{self.name}")

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise BenchError(f"{self.name} exited ({self.process.returncode}):\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    async def stop(self, grace: float = 20.0) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while self.process.poll() is None and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.05)  # a child exiting sets no event we could await
            if self.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                await asyncio.to_thread(self.process.wait, 10)


async def wait_until_ready(child: Child, url: str, within: float = 60.0) -> None:
    """Poll ``url`` until it answers 200, failing fast if the child dies."""
    from bench.httpio import HttpConnection

    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        child.check_alive()
        try:
            conn = await HttpConnection.open(url)
            try:
                status, _ = await asyncio.wait_for(conn.request("GET", urlsplit(url).path), 2)
            finally:
                conn.close()
            if status == 200:
                return
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            pass
        await asyncio.sleep(0.1)
    raise BenchError(f"{child.name} not ready at {url} after {within}s:\n{child.log_tail()}")


def python() -> str:
    return sys.executable


async def machine_info(db_url: str) -> dict[str, object]:
    """Cores, memory, Python and PostgreSQL versions, for the results file."""
    conn = await asyncio.wait_for(asyncpg.connect(with_database(db_url, "postgres")), 30)
    try:
        pg_version = await conn.fetchval("SHOW server_version")
    finally:
        await conn.close()
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():  # noqa: ASYNC240
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cores": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "postgres": pg_version,
        "postgres_source": "DATABASE_URL" if os.environ.get("DATABASE_URL") else "embedded",
        "platform": platform.platform(),
    }


def postgres_cpu_seconds() -> float | None:
    """CPU time of the PostgreSQL server processes on this machine (the server, its
    backends and workers), or None where none can be read (a remote server)."""
    total, seen = 0.0, False
    for process in psutil.process_iter(["name"]):
        name = process.info.get("name") or ""
        if not name.startswith("postgres"):
            continue
        with contextlib.suppress(psutil.Error):
            total += process_cpu_seconds(process)
            seen = True
    return total if seen else None


def process_cpu_seconds(process: psutil.Process) -> float:
    """User and system CPU time of ``process`` (all its threads), in seconds.

    On Linux, read from the kernel's CPU-time clock for the process, exact to the
    nanosecond: ``/proc/<pid>/stat``, which psutil reads, counts in clock ticks (10 ms
    here), so a short stretch of a few jobs could measure no CPU at all. Elsewhere, or
    where the clock cannot be read, psutil's figure. Raises ``psutil.Error`` when the
    process is gone."""
    if sys.platform == "linux":
        # MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED) of the kernel's posix-timers.h, the
        # clock id that clock_getcpuclockid(3) returns for the process.
        with contextlib.suppress(OSError):
            return time.clock_gettime((~process.pid << 3) | 2)
    times = process.cpu_times()
    return float(times.user + times.system)


_MACHINE_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def machine_cpu_seconds() -> tuple[float, float] | None:
    """The machine's CPU time so far, summed over its CPUs, and the part of it the
    hypervisor gave to other guests (steal); None where the kernel does not count steal."""
    times = psutil.cpu_times()
    if not hasattr(times, "steal"):
        return None
    return sum(getattr(times, name, 0.0) for name in _MACHINE_FIELDS), times.steal


class CpuMeter:
    """CPU per job over a stretch of a scenario: the blogpipe processes, PostgreSQL (when it
    runs here) and the harness itself (submitting, receiving webhooks); with what that CPU
    allows at best, and how much of the machine the hypervisor took meanwhile."""

    def __init__(self, processes: Sequence[Child]) -> None:
        self.processes = processes
        self._start = self._read()

    def _read(self) -> tuple[float, float | None, float, tuple[float, float] | None]:
        ours = sum(child.cpu_seconds() for child in self.processes)
        # The harness's own CPU, exact (psutil's figure counts in clock ticks).
        harness = time.process_time()
        return ours, postgres_cpu_seconds(), harness, machine_cpu_seconds()

    def per_job(self, jobs: int) -> dict[str, float]:
        """Milliseconds of CPU per job since this meter was made, and for that stretch:
        ``cpu_floor_s``, the CPU it used (ours, PostgreSQL's when local, the harness's)
        spread over every core, which no schedule could beat; ``steal_pct``, the share of
        the machine's CPU time taken by the hypervisor for other guests (Linux)."""
        (ours, server, harness, machine) = self._read()
        (ours_0, server_0, harness_0, machine_0) = self._start

        def per_job(seconds: float) -> float:
            return round(1000 * seconds / max(jobs, 1), 2)

        used = (ours - ours_0) + (harness - harness_0)
        figures = {
            "cpu_ms_per_job": per_job(ours - ours_0),
            "harness_cpu_ms_per_job": per_job(harness - harness_0),
        }
        if server is not None and server_0 is not None:
            figures["postgres_cpu_ms_per_job"] = per_job(server - server_0)
            used += server - server_0
        figures["cpu_floor_s"] = round(used / len(os.sched_getaffinity(0)), 3)
        if machine is not None and machine_0 is not None and machine[0] > machine_0[0]:
            stolen = machine[1] - machine_0[1]
            figures["steal_pct"] = round(100 * stolen / (machine[0] - machine_0[0]), 1)
        return figures
