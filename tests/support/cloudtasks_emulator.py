"""The ``cloudtasks_emulator`` session fixture: ``gcloud-tasks-emulator`` on a free port.

The emulator lives in its own virtualenv (it pins ``protobuf<5``):
``BLOGPIPE_TASKS_EMULATOR`` names the executable, else
``<repo>/.venv-tasks/bin/gcloud-tasks-emulator`` (``make .venv-tasks/bin/gcloud-tasks-emulator``).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.emulators import missing_emulator
from tests.support.net import free_port
from tests.support.waiting import wait_for

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_EXECUTABLE = REPO_ROOT / ".venv-tasks" / "bin" / "gcloud-tasks-emulator"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
# Bounded so a receiver that keeps failing does not keep the emulator busy all session.
MAX_RETRIES = 5


@dataclass(frozen=True)
class CloudTasksEmulator:
    """A running emulator: ``host`` is what ``CLOUD_TASKS_EMULATOR_HOST`` would hold."""

    host: str
    port: int
    log_path: Path

    def log_tail(self, lines: int = 40) -> str:
        """The end of the emulator's output, for failure messages."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def emulator_executable() -> Path | None:
    """The emulator's path, or None when it is not installed."""
    configured = os.environ.get("BLOGPIPE_TASKS_EMULATOR")
    path = Path(configured) if configured else DEFAULT_EXECUTABLE
    return path if path.is_file() and os.access(path, os.X_OK) else None


async def _accepts_connections(port: int, process: subprocess.Popen[bytes]) -> bool:
    if process.poll() is not None:
        raise RuntimeError(f"gcloud-tasks-emulator exited with code {process.returncode}")
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 1.0)
    except (OSError, TimeoutError):
        return False
    writer.close()
    await writer.wait_closed()
    return True


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=STOP_TIMEOUT)
        except ProcessLookupError:
            pass
    process.wait(timeout=STOP_TIMEOUT)


@pytest.fixture(scope="session")
async def cloudtasks_emulator(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[CloudTasksEmulator]:
    """Start the Cloud Tasks emulator once per session; skip (or fail in CI) if missing."""
    executable = emulator_executable()
    if executable is None:
        wanted = os.environ.get("BLOGPIPE_TASKS_EMULATOR") or DEFAULT_EXECUTABLE
        missing_emulator(
            f"gcloud-tasks-emulator not found at {wanted} (set BLOGPIPE_TASKS_EMULATOR, or run "
            "`make -f Makefile.emulators .venv-tasks/bin/gcloud-tasks-emulator`)"
        )
        return
    port = free_port()
    log_path = tmp_path_factory.mktemp("cloudtasks") / "emulator.log"
    emulator = CloudTasksEmulator(host=f"127.0.0.1:{port}", port=port, log_path=log_path)
    with log_path.open("wb") as log:
        # Popen only forks; unlike an asyncio subprocess the emulator is not tied to the loop.
        process = subprocess.Popen(  # noqa: ASYNC220
            [str(executable), "start", f"--port={port}", f"--max-retries={MAX_RETRIES}"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, stopped as a whole
        )
    try:
        try:
            await wait_for(
                lambda: _accepts_connections(port, process),
                timeout=START_TIMEOUT,
                message="the Cloud Tasks emulator to listen",
            )
        except (AssertionError, RuntimeError) as exc:
            pytest.fail(f"{exc}\n--- emulator output ---\n{emulator.log_tail()}", pytrace=False)
        yield emulator
    finally:
        _stop(process)
