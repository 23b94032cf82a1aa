"""Stage 1: research — a brief of key points, questions, keywords and citable sources."""

from __future__ import annotations

from core.llm import LLM, LLMRequest
from stages.base import StageInput, StageResult
from stages.models import ResearchBrief, Source
from stages.placeholder import placeholder_research
from stages.prompts import RESEARCH_SYSTEM, user_message
from stages.stage_output import as_model, stage_result

NO_SEARCH_WARNING = (
    "Web search is not configured: research used the LLM alone, so sources are "
    "unverified suggestions."
)
MAX_SOURCES = 8


def _clean_sources(sources: list[Source]) -> tuple[list[Source], list[str]]:
    """Keep http(s) sources once each; report what was dropped."""
    kept: dict[str, Source] = {}
    dropped = 0
    for source in sources:
        url = source.url.strip()
        if not url.startswith(("http://", "https://")) or url in kept:
            dropped += 1
            continue
        kept[url] = source.model_copy(update={"url": url, "title": source.title.strip() or url})
    warnings = [f"Dropped {dropped} research sources without a usable URL"] if dropped else []
    return list(kept.values())[:MAX_SOURCES], warnings


class ResearchStage:
    """Asks the LLM for a ResearchBrief (no web search provider is wired yet)."""

    name = "research"

    async def run(self, stage_input: StageInput, llm: LLM) -> StageResult:
        """Produce the research brief."""
        request = stage_input.request
        response = await llm.generate(
            LLMRequest(
                stage=self.name,
                system=RESEARCH_SYSTEM,
                user=user_message(request),
                output_type=ResearchBrief,
                offline=lambda: placeholder_research(request),
                temperature=0.3,
            )
        )
        brief = as_model(response.output, ResearchBrief)
        sources, warnings = _clean_sources(brief.sources)
        brief = brief.model_copy(update={"sources": sources})
        if request.use_google_search:
            warnings.insert(0, NO_SEARCH_WARNING)
        if request.use_citations and not sources:
            warnings.append("Research found no citable sources; the article will have none")
        return stage_result(response, brief.model_dump(mode="json"), warnings)
