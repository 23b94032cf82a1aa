"""The benchmark's target checks: medians for speed, the worst run for bounds."""

from __future__ import annotations

from bench.__main__ import _median, _targets


def _run(makespan: float, rss: float, errors: int = 0) -> dict[str, float]:
    return {
        "makespan_s": makespan,
        "makespan_vs_ideal": makespan / 4,
        "peak_rss_mb": rss,
        "errors": errors,
    }


def test_concurrency_bounds_must_hold_in_every_run() -> None:
    runs = {"concurrency": [_run(7.0, 280.0), _run(9.0, 310.0, errors=1)]}
    checks = _targets({"concurrency": _median(runs["concurrency"])}, {}, runs)
    assert checks["concurrency_makespan"]["value"] == 2.0  # the median: (1.75 + 2.25) / 2
    assert checks["concurrency_makespan"]["met"] is True
    assert checks["concurrency_peak_rss_mb"] == {
        "value": 310.0,
        "target": "<= 300 in every run",
        "met": False,
    }
    assert checks["concurrency_errors"]["value"] == 1
    assert checks["concurrency_errors"]["met"] is False


def test_a_run_that_did_not_finish_fails_the_errors_target() -> None:
    runs = {"concurrency": [_run(7.0, 280.0), {"error": "TimeoutError: no webhook"}]}
    checks = _targets({"concurrency": _median(runs["concurrency"])}, {}, runs)
    assert checks["concurrency_peak_rss_mb"] == {
        "value": 280.0,
        "target": "<= 300 in every run",
        "met": True,
    }
    assert checks["concurrency_errors"]["value"] == 0
    assert checks["concurrency_errors"]["met"] is False


def test_the_scaled_concurrency_scenario_is_checked_against_the_same_bounds_on_its_own() -> None:
    runs = {
        "concurrency": [_run(10.0, 200.0), _run(11.0, 210.0)],
        "concurrency-scaled": [_run(7.6, 290.0), _run(8.0, 296.0)],
    }
    checks = _targets({name: _median(r) for name, r in runs.items()}, {}, runs)
    assert checks["concurrency_makespan"]["met"] is False
    assert checks["concurrency_peak_rss_mb"]["met"] is True
    assert checks["concurrency_scaled_makespan"]["value"] == 1.95
    assert checks["concurrency_scaled_makespan"]["met"] is True
    assert checks["concurrency_scaled_peak_rss_mb"]["value"] == 296.0
    assert checks["concurrency_scaled_errors"] == {
        "value": 0,
        "target": "0 in every run",
        "met": True,
    }
