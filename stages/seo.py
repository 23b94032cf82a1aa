"""Stage 4: seo — the final article: references, snippets, scores, metadata, JSON-LD.

Only the meta title, meta description and related keywords come from the LLM; the
rest is computed from the Markdown in code.
"""

from __future__ import annotations

from typing import Any

from core.llm import LLM, LLMRequest
from stages.article import compose_article, ensure_single_h1
from stages.base import StageInput, StageResult
from stages.citations import CitedContent, apply_citations
from stages.markdown_doc import MarkdownDoc, plain_text
from stages.models import SeoCopy
from stages.placeholder import placeholder_seo
from stages.prompts import SEO_SYSTEM, user_message
from stages.reading_ease import warm as warm_reading_ease
from stages.stage_output import as_model, earlier_output, stage_result

EXCERPT_WORDS = 250


class SeoStage:
    """Finishes the article and writes its search snippets."""

    name = "seo"

    def warm(self) -> None:
        """Load what the first run would otherwise stop to load (``reading_ease.warm``)."""
        warm_reading_ease()

    async def run(self, stage_input: StageInput, llm: LLM) -> StageResult:
        """Produce the final article fields."""
        request = stage_input.request
        title, cited, content, user = self._prompt(stage_input)
        response = await llm.generate(
            LLMRequest(
                stage=self.name,
                system=SEO_SYSTEM,
                user=user,
                output_type=SeoCopy,
                offline=lambda: placeholder_seo(request, title),
                temperature=0.3,
            )
        )
        copy = as_model(response.output, SeoCopy)
        article, quality_warnings = compose_article(
            request,
            content=content,
            title=title,
            copy=copy,
            research=earlier_output(stage_input, "research"),
            citations=cited.citations,
            author=stage_input.settings.author_name,
            publisher=stage_input.settings.publisher_name,
        )
        return stage_result(response, article, [*cited.warnings, *quality_warnings])

    def _prompt(self, stage_input: StageInput) -> tuple[str, CitedContent, MarkdownDoc, str]:
        """The title, the article with its references and parsed, and the prompt for the
        snippets.

        Built apart from the LLM call, so that only what the article needs afterwards is
        kept through it: a call takes seconds and thousands of jobs may be waiting on one
        at once. The document keeps its headings and paragraphs (parsing them again would
        cost about 200 µs a job) but not its per-line view nor the prompt's plain text
        (about 30 KB a job between them)."""
        research = earlier_output(stage_input, "research")
        outline = earlier_output(stage_input, "outline")
        draft = earlier_output(stage_input, "draft")
        markdown, title = ensure_single_h1(str(draft["markdown"]), str(outline["title"]))
        cited = apply_citations(
            markdown, research.get("sources", []), enabled=stage_input.request.use_citations
        )
        content = MarkdownDoc(cited.markdown)
        prose = plain_text("\n\n".join(content.paragraphs))
        excerpt = " ".join(prose.split(maxsplit=EXCERPT_WORDS)[:EXCERPT_WORDS])
        context: dict[str, Any] = {
            "title": title,
            "headings": [h.text for h in content.headings if h.level == 2],
            "excerpt": excerpt,
            "search_intent": research.get("search_intent"),
        }
        content.forget_lines()
        return title, cited, content, user_message(stage_input.request, context)
