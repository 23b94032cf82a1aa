"""The benchmark harness stays runnable: every scenario with a handful of jobs.

The real runs (``make bench``) are not part of the test suite; this only proves each
scenario still starts, pushes a few jobs through and reports figures.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest

from bench.__main__ import Options, run_bench, table
from bench.peer import require_peer_dependencies
from bench.peer.run import redis_available

SMALL = {
    "jobs": 4,
    "runs": 1,
    "concurrency_jobs": 6,
    "delay": 0.2,
    "polling_seconds": 0.5,
    "polling_rate": 50.0,
    "single_jobs": 2,
    "celery_workers": 1,
}
pytestmark = pytest.mark.timeout(120)


def _peer_unavailable() -> str | None:
    try:
        require_peer_dependencies()
    except ImportError as exc:
        return str(exc)
    return redis_available()


async def test_blogpipe_scenarios_report_figures(tmp_path: Path) -> None:
    output = tmp_path / "latest.json"
    options = Options(
        scenarios=(
            "ceiling",
            "throughput",
            "concurrency",
            "concurrency-scaled",
            "polling",
            "single",
        ),
        output=output,
        **SMALL,
    )  # type: ignore[arg-type]
    document = await asyncio.wait_for(run_bench(options, log=lambda _line: None), 150)
    medians = {name: data["median"] for name, data in document["scenarios"].items()}
    for name, figures in medians.items():
        assert "error" not in figures, (name, figures)
    assert medians["ceiling"]["jobs_per_s"] > 0
    assert medians["throughput"]["completed"] == 4
    assert medians["throughput"]["errors"] == 0
    assert medians["concurrency"]["errors"] == 0
    assert medians["concurrency-scaled"]["completed"] == 6
    assert medians["concurrency-scaled"]["processes"] == 2
    for name in ("throughput", "concurrency", "concurrency-scaled"):
        assert medians[name]["cpu_ms_per_job"] > 0, name
        assert medians[name]["harness_cpu_ms_per_job"] > 0, name
        assert medians[name].get("postgres_cpu_ms_per_job", 1) > 0, name
        # The CPU the stretch used, over the cores, cannot exceed the time it took.
        assert 0 < medians[name]["cpu_floor_s"] <= medians[name]["makespan_s"] + 0.5, name
        assert 0 <= medians[name].get("steal_pct", 0) <= 100, name
    assert medians["polling"]["max_requests_per_s"] > 0
    assert medians["polling"]["in_progress_requests_per_s"] > 0
    assert medians["single"]["latency_p50_ms"] > 0
    assert document["ratios"]["throughput_vs_ceiling"] > 0
    assert document["machine"]["cores"] >= 1
    assert orjson.loads(output.read_bytes())["targets"] == document["targets"]
    assert "| throughput |" in table(document)


async def test_celery_peer_reports_figures(tmp_path: Path) -> None:
    reason = _peer_unavailable()
    if reason:
        pytest.skip(reason)
    options = Options(scenarios=("throughput", "peer"), output=tmp_path / "latest.json", **SMALL)  # type: ignore[arg-type]
    document = await asyncio.wait_for(run_bench(options, log=lambda _line: None), 150)
    peer = document["scenarios"]["peer"]["median"]
    assert "error" not in peer, peer
    assert peer["completed"] == 4
    assert document["ratios"]["throughput_vs_celery"] > 0
