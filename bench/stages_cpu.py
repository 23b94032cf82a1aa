"""CPU the four stages spend per job with the offline LLM (no delay, no database).

``python -m bench.stages_cpu [--jobs N] [--runs K] [--profile FILE]``

Runs N distinct jobs (requests of every length, in turn) through research, outline, draft and
seo in one process, K times, and prints the median CPU time per job and per stage.
Compare two versions by running both back to back on the same machine.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import itertools
import statistics
import time
from collections import defaultdict

from core.constants import STAGES
from core.llm.offline import OfflineLLM
from core.requests import BlogRequest, Length
from core.settings import Settings
from stages.base import StageInput
from stages.registry import get_stage

LENGTHS = list(Length)
_taken = itertools.count(1)


def next_request() -> BlogRequest:
    """A request no earlier job had (as in ``bench.load``), so no per-text cache helps."""
    n = next(_taken)
    return BlogRequest(
        topic=f"Best presents for teenagers, take {n}",
        keywords=["gifts for teens", "birthday ideas", "teen presents"],
        target_audience="parents",
        length=LENGTHS[n % len(LENGTHS)],
    )


async def run_jobs(jobs: int) -> dict[str, float]:
    """CPU seconds spent in each stage over ``jobs`` jobs."""
    llm = OfflineLLM()
    settings = Settings()
    spent: dict[str, float] = defaultdict(float)
    for _ in range(jobs):
        request = next_request()
        outputs: dict[str, dict[str, object]] = {}
        for name in STAGES:
            started = time.process_time()
            result = await get_stage(name).run(
                StageInput(request=request, outputs=dict(outputs), settings=settings), llm
            )
            spent[name] += time.process_time() - started
            outputs[name] = result.output
    return spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=40)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--profile", help="write a cProfile of one run to this file")
    args = parser.parse_args()

    asyncio.run(run_jobs(len(LENGTHS)))  # warm-up: imports, regex compilation, caches
    if args.profile:
        profiler = cProfile.Profile()
        profiler.runcall(asyncio.run, run_jobs(args.jobs))
        profiler.dump_stats(args.profile)
    per_stage: dict[str, list[float]] = defaultdict(list)
    totals: list[float] = []
    for _ in range(args.runs):
        spent = asyncio.run(run_jobs(args.jobs))
        for name in STAGES:
            per_stage[name].append(1000 * spent[name] / args.jobs)
        totals.append(1000 * sum(spent.values()) / args.jobs)
    breakdown = "  ".join(f"{name} {statistics.median(per_stage[name]):.2f}" for name in STAGES)
    print(
        f"CPU per job: median {statistics.median(totals):.2f} ms "
        f"(min {min(totals):.2f}, max {max(totals):.2f}; {args.runs} runs of {args.jobs} jobs)"
    )
    print(f"  per stage (ms, median): {breakdown}")


if __name__ == "__main__":
    main()
