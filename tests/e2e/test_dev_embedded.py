"""``blogpipe dev`` on its embedded PostgreSQL: it runs jobs, and stopping it stops the server."""

from __future__ import annotations

from pathlib import Path

import httpx
import psutil

from tests.support.net import free_port
from tests.support.pipeline import PipelineProcess, jobs_completed, submit
from tests.support.waiting import wait_for


def _postmaster(pgdata: Path) -> psutil.Process | None:
    """The server running on ``pgdata``, from its ``postmaster.pid``, or None."""
    try:
        pid = int((pgdata / "postmaster.pid").read_text().split()[0])
        process = psutil.Process(pid)
        return process if process.is_running() else None
    except (FileNotFoundError, IndexError, ValueError, psutil.Error):
        return None


async def test_dev_runs_a_job_on_the_embedded_server_and_stops_it_on_exit(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    env = {
        "DATABASE_URL": "",  # unset: the embedded server under BLOGPIPE_DATA_DIR
        "BLOGPIPE_DATA_DIR": str(data_dir),
        "XDG_RUNTIME_DIR": "",  # its lock file under the data dir, as on a fresh machine
        "PORT": str(free_port()),
        "HOST": "127.0.0.1",
        "BLOGPIPE_AUTH": "none",
        "BLOGPIPE_RATE_LIMIT": "0",
    }
    dev = PipelineProcess(env, tmp_path / "dev.log")
    try:
        await dev.start()
        server = _postmaster(data_dir / "pg")
        assert server is not None, (data_dir / "pg").iterdir()
        async with httpx.AsyncClient(timeout=10) as client:
            job_id = await submit(client, dev.url)
            await wait_for(
                lambda: jobs_completed(client, dev.url, [job_id]),
                timeout=60,
                message="the job to complete on the embedded server",
            )
        # SIGTERM to blogpipe dev alone (the server is in a session of its own, as it is
        # when Ctrl-C reaches only the terminal's process group).
        assert dev.process is not None
        dev.process.terminate()
        dev.process.wait(timeout=60)
        assert dev.process.returncode == 0, (tmp_path / "dev.log").read_text()[-3000:]
        server.wait(timeout=30)  # the postmaster exits: psutil.TimeoutExpired fails the test
        assert _postmaster(data_dir / "pg") is None
    finally:
        dev.stop()
        leftover = _postmaster(data_dir / "pg")
        if leftover is not None:
            leftover.terminate()
