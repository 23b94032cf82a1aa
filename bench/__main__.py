"""``python -m bench [--scenarios ...] [--jobs N] [--runs K] [--quick]``

Runs every selected scenario K times (each run on fresh databases and fresh processes),
writes medians and same-run ratios to ``bench/results/latest.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from bench.blogpipe_runs import concurrency, single_job, throughput, throughput_gcp
from bench.ceiling import ceiling
from bench.infra import REPO, BenchError, Databases, machine_info, server_url
from bench.peer.run import peer
from bench.polling import polling

SCENARIOS = (
    "ceiling",
    "throughput",
    "throughput-scaled",
    "throughput-gcp",
    "concurrency",
    "concurrency-scaled",
    "polling",
    "peer",
    "single",
)
DEFAULT_OUTPUT = REPO / "bench" / "results" / "latest.json"
RATIOS = {
    "throughput_vs_celery": ("throughput", "peer", "jobs_per_s"),
    "throughput_vs_ceiling": ("throughput", "ceiling", "jobs_per_s"),
    "scaled_vs_celery": ("throughput-scaled", "peer", "jobs_per_s"),
    "scaled_vs_ceiling": ("throughput-scaled", "ceiling", "jobs_per_s"),
}


@dataclass(frozen=True)
class Options:
    """What to run and how big."""

    scenarios: tuple[str, ...] = SCENARIOS
    jobs: int = 1000
    runs: int = 2
    gcp_jobs: int = 300
    gcp_runs: int = 1
    concurrency_jobs: int = 2000
    concurrency_runs: int = 2
    delay: float = 1.0
    polling_seconds: float = 5.0
    polling_rate: float = 500.0
    single_jobs: int = 30
    celery_workers: int = 4
    output: Path = DEFAULT_OUTPUT


QUICK = {
    "jobs": 100,
    "runs": 1,
    "gcp_jobs": 30,
    "concurrency_jobs": 200,
    "delay": 0.5,
    "polling_seconds": 2.0,
    "single_jobs": 10,
}


def _scenario(
    name: str, options: Options, dbs: Databases, workdir: Path
) -> Callable[[], Awaitable[dict[str, Any]]]:
    runners: dict[str, Callable[[], Awaitable[dict[str, Any]]]] = {
        "ceiling": lambda: ceiling(dbs, options.jobs),
        "throughput": lambda: throughput(dbs, workdir, options.jobs),
        "throughput-scaled": lambda: throughput(dbs, workdir, options.jobs, 2),
        "throughput-gcp": lambda: throughput_gcp(dbs, workdir, options.gcp_jobs),
        "concurrency": lambda: concurrency(dbs, workdir, options.concurrency_jobs, options.delay),
        "concurrency-scaled": lambda: concurrency(
            dbs, workdir, options.concurrency_jobs, options.delay, 2
        ),
        "polling": lambda: polling(
            dbs, workdir, duration=options.polling_seconds, rate=options.polling_rate
        ),
        "peer": lambda: peer(dbs, workdir, options.jobs, workers=options.celery_workers),
        "single": lambda: single_job(dbs, workdir, options.single_jobs),
    }
    return runners[name]


def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    good = [run for run in runs if "error" not in run]
    if not good:
        return {"error": runs[-1].get("error", "no run finished")} if runs else {}
    merged: dict[str, Any] = {}
    for key, value in good[0].items():
        values = [run[key] for run in good if key in run]
        if isinstance(value, bool) or not isinstance(value, int | float):
            merged[key] = value
        else:
            merged[key] = round(statistics.median(values), 3)
    return merged


def _worst(runs: list[dict[str, Any]], key: str) -> Any:
    """The largest ``key`` over the runs that finished (a bound must hold in every run)."""
    values = [run[key] for run in runs if "error" not in run and key in run]
    return max(values) if values else None


def _targets(
    medians: dict[str, dict[str, Any]],
    ratios: dict[str, float],
    runs: dict[str, list[dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """Each target against the medians; errors and peak RSS against the worst run."""
    checks: dict[str, Any] = {}

    def check(name: str, value: Any, target: str, met: bool) -> None:
        checks[name] = {"value": value, "target": target, "met": met}

    if "throughput_vs_celery" in ratios:
        value = ratios["throughput_vs_celery"]
        check("throughput_vs_celery", value, ">= 2.0", value >= 2.0)
    if "throughput_vs_ceiling" in ratios:
        value = ratios["throughput_vs_ceiling"]
        check("throughput_vs_ceiling", value, ">= 0.40", value >= 0.40)
    for scenario in ("concurrency", "concurrency-scaled"):
        con = medians.get(scenario, {})
        if "makespan_s" not in con:
            continue
        prefix = scenario.replace("-", "_")
        check(
            f"{prefix}_makespan",
            con["makespan_vs_ideal"],
            "<= 2.0 x ideal",
            con["makespan_vs_ideal"] <= 2.0,
        )
        con_runs = (runs or {}).get(scenario) or [con]
        errors = _worst(con_runs, "errors")
        failed = sum("error" in run for run in con_runs)  # a run that did not finish
        check(f"{prefix}_errors", errors, "0 in every run", errors == 0 and not failed)
        rss = _worst(con_runs, "peak_rss_mb")
        check(f"{prefix}_peak_rss_mb", rss, "<= 300 in every run", rss is not None and rss <= 300)
    poll = medians.get("polling", {})
    if "max_requests_per_s" in poll:
        check(
            "polling_requests_per_s",
            poll["max_requests_per_s"],
            ">= 2000",
            poll["max_requests_per_s"] >= 2000,
        )
        check("polling_p99_ms_at_rate", poll["rate_p99_ms"], "<= 25", poll["rate_p99_ms"] <= 25)
    single = medians.get("single", {})
    if "latency_p50_ms" in single:
        check(
            "single_job_p50_ms",
            single["latency_p50_ms"],
            "<= 50",
            0 < single["latency_p50_ms"] <= 50 and single["errors"] == 0,
        )
    return checks


async def run_bench(options: Options, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the scenarios; return (and write) the results document."""
    url = server_url()
    dbs = Databases(url)
    await dbs.prepare()
    started = datetime.now(UTC)
    per_run: dict[str, list[dict[str, Any]]] = {name: [] for name in options.scenarios}
    ratio_runs: dict[str, list[float]] = {name: [] for name in RATIOS}
    try:
        with tempfile.TemporaryDirectory(prefix="blogpipe-bench-") as tmp:
            for k in range(options.runs):
                this_run: dict[str, dict[str, Any]] = {}
                for name in options.scenarios:
                    if name == "throughput-gcp" and k >= options.gcp_runs:
                        continue
                    if name.startswith("concurrency") and k >= options.concurrency_runs:
                        continue
                    workdir = Path(tmp) / f"run{k + 1}" / name
                    workdir.mkdir(parents=True)
                    clock = time.monotonic()
                    try:
                        figures = await _scenario(name, options, dbs, workdir)()
                    except (BenchError, OSError, TimeoutError) as exc:
                        figures = {"error": f"{type(exc).__name__}: {exc}"}
                    figures["wall_s"] = round(time.monotonic() - clock, 1)
                    per_run[name].append(figures)
                    this_run[name] = figures
                    log(f"run {k + 1}/{options.runs} {name}: {_summary(figures)}")
                for ratio, (top, bottom, key) in RATIOS.items():
                    a, b = this_run.get(top, {}), this_run.get(bottom, {})
                    if a.get(key) and b.get(key):
                        ratio_runs[ratio].append(a[key] / b[key])
        medians = {name: _median(runs) for name, runs in per_run.items()}
        ratios = {
            name: round(statistics.median(values), 3)
            for name, values in ratio_runs.items()
            if values
        }
        document = {
            "date": started.isoformat(timespec="seconds"),
            "machine": await machine_info(url),
            "options": {
                k: (str(v) if isinstance(v, Path) else v) for k, v in options.__dict__.items()
            },
            "scenarios": {
                name: {"median": medians[name], "runs": per_run[name]} for name in options.scenarios
            },
            "ratios": ratios,
            "ratio_runs": {
                name: [round(v, 3) for v in values] for name, values in ratio_runs.items()
            },
            "targets": _targets(medians, ratios, per_run),
        }
    finally:
        await dbs.close()
    options.output.parent.mkdir(parents=True, exist_ok=True)
    options.output.write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2) + b"\n")
    return document


def _summary(figures: dict[str, Any]) -> str:
    if "error" in figures:
        return "ERROR " + figures["error"].splitlines()[0][:200]
    keys = (
        "jobs_per_s",
        "latency_p50_ms",
        "latency_p99_ms",
        "makespan_s",
        "errors",
        "peak_rss_mb",
        "cpu_ms_per_job",
        "postgres_cpu_ms_per_job",
        "cpu_floor_s",
        "steal_pct",
        "max_requests_per_s",
        "rate_p99_ms",
        "in_progress_requests_per_s",
        "transactions_per_s",
    )
    return ", ".join(f"{key}={figures[key]}" for key in keys if key in figures)


def table(document: dict[str, Any]) -> str:
    """The results as a Markdown table (what the README quotes)."""
    rows = ["| scenario | figures (median) |", "|---|---|"]
    for name, data in document["scenarios"].items():
        rows.append(f"| {name} | {_summary(data['median'])} |")
    lines = ["\n".join(rows), "", "| target | measured | goal | met |", "|---|---|---|---|"]
    for name, check in document["targets"].items():
        lines.append(
            f"| {name} | {check['value']} | {check['target']} | {'yes' if check['met'] else 'NO'} |"
        )
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument("--jobs", type=int, help="jobs for ceiling, throughput and peer")
    parser.add_argument("--runs", type=int, help="runs per scenario (medians are reported)")
    parser.add_argument("--quick", action="store_true", help="small sizes, one run")
    parser.add_argument("--gcp-jobs", type=int)
    parser.add_argument("--concurrency-jobs", type=int)
    parser.add_argument("--concurrency-runs", type=int)
    parser.add_argument("--gcp-runs", type=int)
    parser.add_argument("--delay", type=float, help="LLM delay per stage for concurrency")
    parser.add_argument("--polling-seconds", type=float)
    parser.add_argument("--single-jobs", type=int)
    parser.add_argument("--celery-workers", type=int)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    values: dict[str, Any] = dict(QUICK) if args.quick else {}
    values["scenarios"] = tuple(args.scenarios)
    for name in (
        "jobs",
        "runs",
        "gcp_jobs",
        "gcp_runs",
        "concurrency_jobs",
        "concurrency_runs",
        "delay",
        "polling_seconds",
        "single_jobs",
        "celery_workers",
        "output",
    ):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    return Options(**values)


def main(argv: list[str] | None = None) -> int:
    options = parse(argv)
    logging.basicConfig(level=logging.WARNING)
    document = asyncio.run(run_bench(options, log=lambda line: print(line, flush=True)))
    print()
    print(table(document))
    print(f"\nwritten to {options.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
