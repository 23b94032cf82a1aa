"""A polling load generator, run as its own process: ``python -m bench.loadgen``.

``--rate 0`` is closed loop (each connection sends its next request when the previous
answer arrives: the most the server can do). ``--rate R`` is open loop: requests are
scheduled every 1/R s and latency is measured from the scheduled time, so a stalled
server is not hidden (no coordinated omission). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import orjson

from bench.httpio import HttpConnection
from bench.load import percentile


async def closed_loop(url: str, paths: list[str], connections: int, duration: float) -> dict:
    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + duration

    async def worker(offset: int) -> None:
        nonlocal errors
        conn = await HttpConnection.open(url)
        i = offset
        try:
            while time.perf_counter() < stop_at:
                started = time.perf_counter()
                status, _ = await asyncio.wait_for(conn.request("GET", paths[i % len(paths)]), 10)
                latencies.append((time.perf_counter() - started) * 1000)
                errors += status != 200
                i += 1
        finally:
            conn.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker(n) for n in range(connections)))
    elapsed = time.perf_counter() - started
    return _figures(latencies, errors, elapsed)


async def open_loop(
    url: str, paths: list[str], connections: int, duration: float, rate: float
) -> dict:
    latencies: list[float] = []
    errors = 0
    idle: asyncio.Queue[HttpConnection] = asyncio.Queue()
    for _ in range(connections):
        idle.put_nowait(await HttpConnection.open(url))

    async def one(path: str, scheduled: float) -> None:
        nonlocal errors
        conn = await idle.get()
        try:
            status, _ = await asyncio.wait_for(conn.request("GET", path), 10)
            errors += status != 200
        finally:
            idle.put_nowait(conn)
        latencies.append((time.perf_counter() - scheduled) * 1000)

    tasks: list[asyncio.Task[None]] = []
    started = time.perf_counter()
    total = int(duration * rate)
    for i in range(total):
        scheduled = started + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(paths[i % len(paths)], scheduled)))
    await asyncio.wait_for(asyncio.gather(*tasks), 60)
    elapsed = time.perf_counter() - started
    while not idle.empty():
        idle.get_nowait().close()
    return _figures(latencies, errors, elapsed)


def _figures(latencies: list[float], errors: int, elapsed: float) -> dict:
    return {
        "requests": len(latencies),
        "errors": errors,
        "requests_per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round(percentile(latencies, 50), 2),
        "p99_ms": round(percentile(latencies, 99), 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--paths-file", required=True, help="one request path per line")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--rate", type=float, default=0.0)
    args = parser.parse_args(argv)
    with open(args.paths_file) as handle:
        paths = [line.strip() for line in handle if line.strip()]
    if args.rate > 0:
        result = open_loop(args.url, paths, args.connections, args.duration, args.rate)
    else:
        result = closed_loop(args.url, paths, args.connections, args.duration)
    sys.stdout.write(orjson.dumps(asyncio.run(result)).decode() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
