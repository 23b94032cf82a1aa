"""The CONTRACT result object: the seo stage's article plus run totals and all warnings."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from core.constants import STAGES


def _stage_entry(entry: Mapping[str, Any]) -> dict[str, Any]:
    """One ``stage_results`` item: ``{stage, provider, tokens, cost}`` (plus model if known)."""
    item: dict[str, Any] = {
        "stage": str(entry["stage"]),
        "provider": str(entry.get("provider") or "unknown"),
        "tokens": int(entry.get("tokens") or 0),
        "cost": round(float(entry.get("cost") or 0.0), 6),
    }
    if entry.get("model"):
        item["model"] = str(entry["model"])
    return item


def merged_warnings(outputs: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Warnings of every stage in pipeline order, each once."""
    merged: dict[str, None] = {}
    for stage in STAGES:
        for warning in (outputs.get(stage) or {}).get("warnings") or []:
            merged.setdefault(str(warning), None)
    return list(merged)


def build_result(
    outputs: Mapping[str, Mapping[str, Any]],
    stage_results: list[dict[str, Any]],
    generation_time: float,
) -> dict[str, Any]:
    """The result object of a finished job (sync response body and ``jobs.result``)."""
    if "seo" not in outputs:
        raise ValueError("cannot build a result before the seo stage has finished")
    result = dict(outputs["seo"])
    entries = [_stage_entry(entry) for entry in stage_results]
    result["stage_results"] = entries
    result["total_tokens"] = sum(entry["tokens"] for entry in entries)
    result["total_cost"] = round(sum(entry["cost"] for entry in entries), 6)
    result["generation_time"] = round(float(generation_time), 3)
    result["warnings"] = merged_warnings(outputs)
    return result
