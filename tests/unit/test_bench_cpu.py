"""The bench's CPU readings: exact for short stretches, and a gone process is an error."""

from __future__ import annotations

import selectors
import subprocess
import sys
import time

import psutil
import pytest

from bench.infra import CpuMeter, process_cpu_seconds

BURN = 0.05
"""CPU seconds the child process burns before it says so."""

_CHILD = f"""
import sys, time
while time.process_time() < {BURN}:
    pass
print("burnt", flush=True)
sys.stdin.read()
"""


def _read_line(process: subprocess.Popen[str], timeout: float = 30.0) -> str:
    assert process.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            raise AssertionError(f"no line from the child within {timeout} s")
    return process.stdout.readline()


def test_a_stretch_shorter_than_a_clock_tick_still_counts_the_harness_cpu() -> None:
    meter = CpuMeter([])
    started = time.process_time()
    while time.process_time() - started < 0.002:  # 2 ms: a fifth of a 10 ms tick
        pass
    figures = meter.per_job(1)
    assert 2.0 <= figures["harness_cpu_ms_per_job"] < 1000
    assert figures["cpu_ms_per_job"] == 0  # no blogpipe processes were measured
    assert figures["cpu_floor_s"] > 0


def test_another_process_cpu_is_read_and_a_gone_one_is_an_error() -> None:
    with subprocess.Popen(
        [sys.executable, "-c", _CHILD],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as process:
        assert process.stdin is not None
        try:
            assert _read_line(process).strip() == "burnt"
            child = psutil.Process(process.pid)
            measured = process_cpu_seconds(child)
            ticks = child.cpu_times()
            assert measured >= BURN
            # The same CPU as /proc/<pid>/stat counts, which rounds to clock ticks.
            assert abs(measured - (ticks.user + ticks.system)) < 0.05
        finally:
            process.stdin.close()
            process.wait(timeout=30)
    with pytest.raises(psutil.Error):
        process_cpu_seconds(child)
