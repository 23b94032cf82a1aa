"""Stage 1: research — perspectives, facts and citable sources for the article.

With ``use_google_search`` and ``GOOGLE_SEARCH_*`` configured, two to four plain
queries go to the web search API; the sources are de-duplicated, block-listed domains
dropped, distinct domains preferred, and the LLM writes the brief grounded in those
source ids. Otherwise the LLM writes the brief alone and suggests sources, and the
result says they are unverified.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from core.llm import LLM, LLMRequest, LLMResponse
from core.search import PROVIDER as SEARCH_PROVIDER
from core.search import GoogleSearch, SearchHit, search_configured
from core.settings import Settings
from stages.base import StageInput, StageResult
from stages.models import Fact, ResearchBrief, ResearchNotes
from stages.placeholder import placeholder_research
from stages.prompts import RESEARCH_GROUNDED_SYSTEM, RESEARCH_SYSTEM, user_message
from stages.sources import (
    MAX_SOURCES,
    CandidateSource,
    build_queries,
    collect,
    domain_of,
    normalise_url,
    prefer_distinct_domains,
    source_records,
)
from stages.stage_output import as_model, stage_result

NO_SEARCH_WARNING = (
    "Web search is not configured: research used the LLM alone, so sources are "
    "unverified suggestions."
)
NO_RESULTS_WARNING = "Web search returned no usable sources; research used the LLM alone"
LLM_PROVIDER = "llm"
"""``provider`` of sources the LLM suggested (not retrieved)."""


async def search_sources(
    settings: Settings, queries: list[str]
) -> tuple[list[dict[str, Any]], list[str]]:
    """Run the queries, then keep unique, allowed sources from several domains."""
    async with GoogleSearch.from_settings(settings) as search:
        answers = await asyncio.gather(
            *(search.search(query) for query in queries), return_exceptions=True
        )
    for answer in answers:
        if isinstance(answer, BaseException):
            raise answer
    hits: list[list[SearchHit]] = [answer for answer in answers if isinstance(answer, list)]
    candidates, duplicates, blocked = collect(hits, settings.search_blocked_domains)
    chosen = prefer_distinct_domains(candidates)
    notes: list[str] = []
    if blocked:
        notes.append(f"Dropped {blocked} search results from block-listed domains")
    if len({c.domain for c in chosen}) < 2 and chosen:
        notes.append("Web search found sources on a single domain only")
    del duplicates  # expected with several queries; not worth a warning
    return source_records(chosen, SEARCH_PROVIDER), notes


def suggested_sources(brief: ResearchBrief) -> tuple[list[dict[str, Any]], dict[str, str], int]:
    """The LLM's suggested sources as stored records, the id mapping, and how many were dropped."""
    kept: dict[str, CandidateSource] = {}
    ids: dict[str, str] = {}
    for source in brief.sources:
        url = source.url.strip()
        if not url.startswith(("http://", "https://")) or not domain_of(url):
            continue
        key = normalise_url(url)
        if key not in kept and len(kept) < MAX_SOURCES:
            snippets = [source.snippet.strip()] if source.snippet.strip() else []
            kept[key] = CandidateSource(url, source.title.strip() or url, domain_of(url), snippets)
        if key in kept:
            ids[source.id.strip()] = f"S{list(kept).index(key) + 1}"
    records = source_records(list(kept.values()), LLM_PROVIDER)
    return records, ids, len(brief.sources) - len(ids)


def ground_facts(
    facts: list[Fact], known: set[str], aliases: dict[str, str] | None = None
) -> tuple[list[dict[str, Any]], int]:
    """Facts citing only known source ids; facts left with no source are dropped."""
    grounded: list[dict[str, Any]] = []
    for fact in facts:
        ids = [(aliases or {}).get(i.strip(), i.strip()) for i in fact.source_ids]
        ids = list(dict.fromkeys(i for i in ids if i in known))
        if fact.claim.strip() and ids:
            grounded.append({"claim": fact.claim.strip(), "source_ids": ids})
    return grounded, len(facts) - len(grounded)


def _grounded_placeholder(request: Any) -> ResearchNotes:
    brief = placeholder_research(request)
    return ResearchNotes.model_validate(brief.model_dump(exclude={"sources"}))


class ResearchStage:
    """Web search (when configured) plus an LLM-written research brief."""

    name = "research"

    async def run(self, stage_input: StageInput, llm: LLM) -> StageResult:
        """Produce the research brief."""
        request, settings = stage_input.request, stage_input.settings
        warnings: list[str] = []
        queries: list[str] = []
        sources: list[dict[str, Any]] = []
        if request.use_google_search and search_configured(settings):
            queries = build_queries(request)
            await stage_input.report(0.1, f"Searching the web: {len(queries)} queries")
            sources, notes = await search_sources(settings, queries)
            warnings += notes
            domains = len({domain_of(str(s["url"])) for s in sources})
            await stage_input.report(
                0.4, f"Found {len(sources)} sources on {domains} sites; writing the brief"
            )
            if not sources:
                warnings.append(NO_RESULTS_WARNING)
        elif request.use_google_search:
            warnings.append(NO_SEARCH_WARNING)

        if sources:
            response = await self._grounded(stage_input, llm, sources)
            notes_model = as_model(response.output, ResearchNotes)
            aliases: dict[str, str] = {}
        else:
            response = await self._llm_only(stage_input, llm)
            brief = as_model(response.output, ResearchBrief)
            sources, aliases, dropped = suggested_sources(brief)
            if dropped:
                warnings.append(f"Dropped {dropped} suggested sources without a usable URL")
            notes_model = ResearchNotes.model_validate(brief.model_dump(exclude={"sources"}))
        facts, ungrounded = ground_facts(
            notes_model.facts, {str(s["id"]) for s in sources}, aliases
        )
        if ungrounded:
            warnings.append(f"Dropped {ungrounded} research facts that cited no known source")
        if request.use_citations and not sources:
            warnings.append("Research found no citable sources; the article will have none")
        output = notes_model.model_dump(mode="json")
        output.update(
            {
                "facts": facts,
                "sources": sources,
                "queries": queries,
                "search_provider": SEARCH_PROVIDER if queries else None,
                "researched_at": datetime.now(UTC).isoformat(timespec="seconds"),
            }
        )
        return stage_result(response, output, warnings)

    async def _grounded(
        self, stage_input: StageInput, llm: LLM, sources: list[dict[str, Any]]
    ) -> LLMResponse:
        request = stage_input.request
        context = {
            "sources": [
                {"id": s["id"], "title": s["title"], "url": s["url"], "snippets": s["snippets"]}
                for s in sources
            ]
        }
        return await llm.generate(
            LLMRequest(
                stage=self.name,
                system=RESEARCH_GROUNDED_SYSTEM,
                user=user_message(request, context),
                output_type=ResearchNotes,
                offline=lambda: _grounded_placeholder(request),
                temperature=0.3,
            )
        )

    async def _llm_only(self, stage_input: StageInput, llm: LLM) -> LLMResponse:
        request = stage_input.request
        return await llm.generate(
            LLMRequest(
                stage=self.name,
                system=RESEARCH_SYSTEM,
                user=user_message(request),
                output_type=ResearchBrief,
                offline=lambda: placeholder_research(request),
                temperature=0.3,
            )
        )
