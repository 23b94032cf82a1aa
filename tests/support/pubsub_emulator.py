"""The ``pubsub_emulator`` fixture: the official Pub/Sub emulator on a free loopback port.

Started once per session (about a second), in its own process group so teardown can
kill the JVM and anything the launcher spawned. It keeps messages in memory only, so
tests isolate themselves with a fresh project id each (``emulator.project()``).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.emulators import missing_emulator
from tests.support.net import free_port

STARTUP_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
START_ATTEMPTS = 3


@dataclass(frozen=True)
class PubSubEmulator:
    """A running emulator: ``host`` is ``127.0.0.1:PORT`` (what ``PUBSUB_EMULATOR_HOST`` takes)."""

    host: str
    log_path: Path

    def project(self, prefix: str = "bp-test") -> str:
        """A project id no other test uses, so topics and subscriptions never collide."""
        return f"{prefix}-{uuid.uuid4().hex[:10]}"


def _sdk_roots() -> Iterator[Path]:
    """Where the Cloud SDK lives: beside the resolved ``gcloud`` (instant), else ask it (~3 s)."""
    gcloud = shutil.which("gcloud")
    if gcloud is None:
        return
    yield Path(gcloud).resolve().parent.parent
    try:
        result = subprocess.run(
            [gcloud, "info", "--format=value(installation.sdk_root)"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
    except (subprocess.SubprocessError, OSError):
        return
    if result.stdout.strip():
        yield Path(result.stdout.strip())


def _command(port: int, data_dir: Path) -> list[str] | None:
    """The fast launcher from the SDK, else ``gcloud beta emulators pubsub start``."""
    for root in _sdk_roots():
        launcher = root / "platform" / "pubsub-emulator" / "bin" / "cloud-pubsub-emulator"
        if launcher.is_file():
            return [str(launcher), "--host=127.0.0.1", f"--port={port}"]
    gcloud = shutil.which("gcloud")
    if gcloud is None:
        return None
    return [
        gcloud,
        "beta",
        "emulators",
        "pubsub",
        "start",
        f"--host-port=127.0.0.1:{port}",
        f"--data-dir={data_dir}",
        "--project=blogpipe-test",
        "--quiet",
    ]


def _ready(host: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{host}/", timeout=1.0) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Kill the whole process group: the launcher script and the JVM it started."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=STOP_TIMEOUT)
            break
        except subprocess.TimeoutExpired:
            continue


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _start(workdir: Path) -> tuple[subprocess.Popen[bytes], PubSubEmulator] | None:
    """Start one emulator; None when it exits before becoming ready (port race)."""
    port = free_port()
    data_dir = workdir / f"data-{port}"
    data_dir.mkdir()
    command = _command(port, data_dir)
    if command is None:
        missing_emulator("Pub/Sub emulator not available: gcloud is not installed")
        raise AssertionError("unreachable")
    log_path = workdir / f"emulator-{port}.log"
    host = f"127.0.0.1:{port}"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command,
            cwd=data_dir,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if _ready(host):
            return process, PubSubEmulator(host=host, log_path=log_path)
        if process.poll() is not None:
            _stop(process)
            return None
        time.sleep(0.1)
    _stop(process)
    raise RuntimeError(
        f"Pub/Sub emulator not ready on {host} after {STARTUP_TIMEOUT}s:\n{_tail(log_path)}"
    )


@pytest.fixture(scope="session")
def pubsub_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PubSubEmulator]:
    """A session-wide Pub/Sub emulator; skips (or fails in CI) when it is not installed."""
    if shutil.which("gcloud") is None:
        missing_emulator("Pub/Sub emulator not available: gcloud is not installed")
    if shutil.which("java") is None:
        missing_emulator("Pub/Sub emulator not available: java is not installed")
    workdir = tmp_path_factory.mktemp("pubsub-emulator")
    for _ in range(START_ATTEMPTS):
        started = _start(workdir)
        if started is not None:
            break
    else:
        logs = sorted(workdir.glob("emulator-*.log"))
        detail = _tail(logs[-1]) if logs else ""
        missing_emulator(f"Pub/Sub emulator exited before becoming ready:\n{detail}")
        return
    process, emulator = started
    try:
        yield emulator
    finally:
        _stop(process)
