"""Stage 2: outline — H1, H2/H3 sections with word budgets that fit the length band, FAQ."""

from __future__ import annotations

from typing import Any

from core.errors import RetryableError
from core.llm import LLM, LLMRequest
from core.requests import BlogRequest
from stages.base import StageInput, StageResult
from stages.budget import FAQ_COUNT, SECTION_COUNT, body_words, faq_words, scale_budgets
from stages.models import Outline, OutlineSection
from stages.placeholder import placeholder_outline
from stages.prompts import OUTLINE_SYSTEM, content_requirements, user_message
from stages.stage_output import as_model, earlier_output, stage_result

MAX_SECTIONS = 12


def normalise_outline(
    outline: Outline,
    request: BlogRequest,
    questions: list[str],
    source_ids: list[str] | None = None,
) -> tuple[Outline, list[str]]:
    """Fix what code can fix: empty parts, FAQ per the request, budgets summing to the band,
    section source ids that name a research source."""
    known = set(source_ids or [])
    warnings: list[str] = []
    sections = [s for s in outline.sections if s.heading.strip()][:MAX_SECTIONS]
    if not sections:
        raise RetryableError("the outline has no sections")
    faq: list[str] = []
    if request.include_faq_section:
        faq = [q.strip() for q in outline.faq_questions if q.strip()] or questions
        faq = list(dict.fromkeys(faq))[: FAQ_COUNT[request.length]]
        if not faq:
            warnings.append("No FAQ questions were found; the FAQ section is left out")
    budget = body_words(request, len(sections), len(faq))
    weights = [outline.intro_target_words] + [s.target_words for s in sections]
    budgets = scale_budgets(weights, budget)
    title = " ".join(outline.title.split()).lstrip("# ") or request.topic
    fixed = Outline(
        title=title,
        intro_target_words=budgets[0],
        sections=[
            OutlineSection(
                heading=" ".join(section.heading.split()).lstrip("# "),
                target_words=words,
                key_points=section.key_points,
                source_ids=[i for i in dict.fromkeys(section.source_ids) if i in known],
                subsections=[sub for sub in section.subsections if sub.heading.strip()],
            )
            for section, words in zip(sections, budgets[1:], strict=True)
        ],
        faq_questions=faq,
    )
    return fixed, warnings


def planned_words(outline: Outline, request: BlogRequest) -> int:
    """Words the outline plans for: introduction, sections and FAQ."""
    body = outline.intro_target_words + sum(s.target_words for s in outline.sections)
    return body + faq_words(request, len(outline.faq_questions))


class OutlineStage:
    """Plans the article from the research brief."""

    name = "outline"

    async def run(self, stage_input: StageInput, llm: LLM) -> StageResult:
        """Produce the outline."""
        request = stage_input.request
        research = earlier_output(stage_input, "research")
        questions = [str(q) for q in research.get("questions", [])]
        sources = research.get("sources") or []
        source_ids = [str(s.get("id")) for s in sources if s.get("id")]
        context: dict[str, Any] = {
            "research": {
                key: research.get(key)
                for key in (
                    "summary",
                    "key_points",
                    "audience_insights",
                    "questions",
                    "semantic_keywords",
                    "search_intent",
                    "perspectives",
                    "facts",
                    "entities",
                    "competitor_headings",
                )
            },
            "sources": [{"id": s.get("id"), "title": s.get("title")} for s in sources],
            "requirements": content_requirements(request),
            "sections_wanted": SECTION_COUNT[request.length],
            "faq_questions_wanted": FAQ_COUNT[request.length] if request.include_faq_section else 0,
            "words_for_introduction_and_sections": body_words(
                request, SECTION_COUNT[request.length], FAQ_COUNT[request.length]
            ),
        }
        response = await llm.generate(
            LLMRequest(
                stage=self.name,
                system=OUTLINE_SYSTEM,
                user=user_message(request, context),
                output_type=Outline,
                offline=lambda: placeholder_outline(request, questions, source_ids),
                temperature=0.4,
            )
        )
        outline, warnings = normalise_outline(
            as_model(response.output, Outline), request, questions, source_ids
        )
        output = outline.model_dump(mode="json")
        output["planned_words"] = planned_words(outline, request)
        return stage_result(response, output, warnings)
