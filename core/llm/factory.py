"""Choosing the LLM provider from settings."""

from __future__ import annotations

from core.llm import LLM
from core.llm.offline import OfflineLLM
from core.settings import Settings


def build_llm(settings: Settings) -> LLM:
    """``offline`` → OfflineLLM; ``openai`` → OpenAILLM (the SDK is imported only then)."""
    if settings.llm == "openai":
        from core.llm.openai_client import OpenAILLM

        return OpenAILLM(
            settings,
            structured_mode=settings.openai_structured_mode,
            max_concurrency=settings.llm_max_concurrency,
        )
    return OfflineLLM(settings.offline_llm_delay)
