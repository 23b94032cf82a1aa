"""The ``blogpipe`` CLI as a user runs it: set-up commands are idempotent, bad
configuration fails at start-up naming the variable."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.pipeline import REPO


async def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    full_env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("BLOGPIPE_", "PUBSUB_", "CLOUD_TASKS_", "GOOGLE_CLOUD"))
    }
    full_env.update(env or {})

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "blogpipe", *args],
            cwd=REPO,
            env=full_env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    return await asyncio.wait_for(asyncio.to_thread(run), timeout=timeout + 10)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("BLOGPIPE_BROKER", "kafka"),
        ("PORT", "eighty"),
        ("WEBHOOK_SECRET", "not-a-whsec"),
        ("BLOGPIPE_OFFLINE_LLM_DELAY", "-1"),
        ("CLOUD_RUN_WORKER_URL", "ftp://worker"),
    ],
)
async def test_invalid_settings_fail_naming_the_variable(variable: str, value: str) -> None:
    result = await run_cli("migrate", env={variable: value})
    assert result.returncode == 2
    assert variable in result.stderr
    assert "Traceback" not in result.stderr


async def test_dev_on_a_port_in_use_fails_at_once_naming_port(tmp_path: Path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    data_dir = tmp_path / "data"
    try:
        result = await run_cli(
            "dev",
            env={
                "DATABASE_URL": "",  # the embedded server, which must not even start
                "BLOGPIPE_DATA_DIR": str(data_dir),
                "HOST": "127.0.0.1",
                "PORT": str(port),
            },
        )
    finally:
        taken.close()
    assert result.returncode == 2, result.stderr
    assert f"cannot listen on 127.0.0.1:{port} (Address already in use)" in result.stderr
    assert "set PORT" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (data_dir / "pg").exists()  # it failed before starting PostgreSQL


async def test_unknown_stage_is_a_usage_error() -> None:
    result = await run_cli("stage", "proofread")
    assert result.returncode == 2
    assert "research" in result.stderr and "proofread" in result.stderr


async def test_migrate_is_idempotent(database_url: str) -> None:
    for _ in range(2):
        result = await run_cli("migrate", env={"DATABASE_URL": database_url})
        assert result.returncode == 0, result.stderr
        assert "migrated" in result.stdout


@pytest.mark.pubsub
@pytest.mark.cloudtasks
async def test_init_creates_topology_idempotently(
    database_url: str, pubsub_emulator: Any, cloudtasks_emulator: Any
) -> None:
    env = {
        "DATABASE_URL": database_url,
        "BLOGPIPE_BROKER": "pubsub",
        "BLOGPIPE_TASK_QUEUE": "cloudtasks",
        "GOOGLE_CLOUD_PROJECT": pubsub_emulator.project("bp-init"),
        "PUBSUB_EMULATOR_HOST": pubsub_emulator.host,
        "CLOUD_TASKS_EMULATOR_HOST": cloudtasks_emulator.host,
        "CLOUD_RUN_WORKER_URL": "http://127.0.0.1:9/api/v1/blog/worker",
        "BLOGPIPE_AUTH": "none",
    }
    first = await run_cli("init", env=env)
    assert first.returncode == 0, first.stderr
    second = await run_cli("init", env=env)
    assert second.returncode == 0, second.stderr
    for name in ("blog-research", "blog-seo-dead-letter", "blog-draft-worker", "blog-job-events"):
        assert name in first.stdout
    assert "blog-generation-queue" in first.stdout
