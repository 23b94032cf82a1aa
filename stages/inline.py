"""Running the four stages in-process, one after another (the API's sync mode)."""

from __future__ import annotations

import time
from typing import Any

from core.constants import STAGES
from core.llm import LLM
from core.requests import BlogRequest
from core.settings import Settings
from stages.base import ProgressReporter, StageInput, no_progress
from stages.registry import get_stage
from stages.result import build_result


async def run_inline(
    request: BlogRequest,
    llm: LLM,
    settings: Settings,
    report: ProgressReporter = no_progress,
) -> dict[str, Any]:
    """Generate the article now and return the CONTRACT result object."""
    started = time.perf_counter()
    outputs: dict[str, dict[str, Any]] = {}
    stage_results: list[dict[str, Any]] = []
    for name in STAGES:
        result = await get_stage(name).run(
            StageInput(request=request, outputs=dict(outputs), settings=settings, report=report),
            llm,
        )
        outputs[name] = result.output
        stage_results.append(
            {
                "stage": name,
                "provider": result.provider,
                "model": result.model,
                "tokens": result.usage.total_tokens,
                "cost": result.usage.cost,
            }
        )
    return build_result(outputs, stage_results, time.perf_counter() - started)
