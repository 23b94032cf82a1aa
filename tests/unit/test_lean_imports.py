"""A serving process on the embedded defaults loads no library it does not use.

Each process (``blogpipe dev``, each ``--replicas`` child, each ``blogpipe stage`` on
Cloud Run) pays for every module it imports in resident memory: alembic about 11 MB,
google-auth with cryptography about 8 MB, httpx (with click and rich where installed)
about 6 MB. These load only where they are needed: alembic in the process that
migrates and only when the database is behind (tests/integration/test_migrations.py),
google-auth where OIDC caller checks are on, httpx where web search is
configured.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SCRIPT = """
import json, sys
import blogpipe.cli, blogpipe.runtime, notifier.service, stages.research, stages.seo
from api.caller_auth import push_authorizer, worker_authorizer
from core.settings import Settings

settings = Settings()
worker_authorizer(settings)
push_authorizer(settings)
if len(sys.argv) > 1:
    worker_authorizer(Settings(worker_audience="https://worker.example"))
loaded = {name: name in sys.modules for name in ("alembic", "google.auth", "httpx")}
print(json.dumps(loaded))
"""


def _loaded(*argv: str) -> dict[str, bool]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("WORKER_", "PUSH_", "GOOGLE_", "CLOUD_TASKS_", "PUBSUB_"))
    }
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, *argv],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    loaded: dict[str, bool] = json.loads(result.stdout.strip().splitlines()[-1])
    return loaded


def test_the_serving_modules_on_defaults_load_neither_alembic_google_auth_nor_httpx() -> None:
    assert _loaded() == {"alembic": False, "google.auth": False, "httpx": False}


def test_an_oidc_caller_check_loads_google_auth() -> None:
    assert _loaded("oidc")["google.auth"] is True
