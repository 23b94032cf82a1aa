"""Assembling the final article fields from the finished Markdown (all deterministic)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from core.requests import BlogRequest
from stages.citations import REFERENCES_HEADING
from stages.markdown_doc import Heading, MarkdownDoc, reading_time, slugify
from stages.models import SeoCopy
from stages.quality import assess, dimensions, overall
from stages.seo_analysis import (
    analyse_keywords,
    fit_meta_description,
    fit_meta_title,
    make_slug,
    readability,
    seo_score,
)
from stages.structured_data import blog_posting, faq_entries, is_faq_heading, social_tags

MAX_SEMANTIC_KEYWORDS = 15
MAX_INTERNAL_LINKS = 5
_H1 = re.compile(r"^#\s+(.+?)\s*#*\s*$", re.MULTILINE)


def ensure_single_h1(markdown: str, title: str) -> tuple[str, str]:
    """Markdown with exactly one H1 at the top, and that H1's text."""
    found = _H1.search(markdown)
    if found is None:
        return f"# {title}\n\n{markdown.lstrip()}", title
    head, rest = markdown[: found.end()], markdown[found.end() :]
    # Any later H1 becomes an H2, so the outline stays a tree.
    rest = _H1.sub(lambda m: f"## {m.group(1)}", rest)
    if head[: found.start()].strip():
        # Text before the H1 (a preamble) is dropped: the article starts at its title.
        head = head[found.start() :]
    return head + rest, found.group(1).strip()


def semantic_keywords(request: BlogRequest, *candidates: Sequence[str]) -> list[str]:
    """Related keywords from research and SEO, without the requested ones, deduplicated."""
    if not request.use_semantic_keywords:
        return []
    taken = {keyword.lower() for keyword in request.keywords}
    merged: dict[str, str] = {}
    for group in candidates:
        for keyword in group:
            clean = " ".join(str(keyword).split())
            if clean and clean.lower() not in taken and clean.lower() not in merged:
                merged[clean.lower()] = clean
    return list(merged.values())[:MAX_SEMANTIC_KEYWORDS]


def internal_links(
    request: BlogRequest, content_links: Sequence[Mapping[str, str]], related: Sequence[str]
) -> list[dict[str, Any]]:
    """Site-relative links found in the article, then suggested targets for related topics."""
    found: list[dict[str, Any]] = [
        {"anchor_text": link["text"], "url": link["url"], "suggested": False}
        for link in content_links
        if link["url"].startswith(("/", "#")) and not link["url"].startswith("//")
    ]
    for keyword in [*request.keywords[1:], *related][:MAX_INTERNAL_LINKS]:
        found.append({"anchor_text": keyword, "url": f"/{slugify(keyword)}", "suggested": True})
    return found


def _heading_json(heading_list: Sequence[Heading]) -> list[dict[str, Any]]:
    return [{"level": h.level, "text": h.text, "id": h.id} for h in heading_list]


def compose_article(
    request: BlogRequest,
    *,
    content: str | MarkdownDoc,
    title: str,
    copy: SeoCopy,
    research: Mapping[str, Any],
    citations: list[dict[str, Any]],
    author: str = "blogpipe",
    publisher: str = "blogpipe",
) -> tuple[dict[str, Any], list[str]]:
    """Every CONTRACT result field except run totals, and the quality warnings."""
    doc = MarkdownDoc.of(content)
    primary = request.keywords[0]
    heading_list = list(doc.headings)
    link_list = [{"text": link.text, "url": link.url} for link in doc.links]
    word_total = doc.word_count
    flesch = readability(doc)
    meta_title = fit_meta_title(copy.meta_title, title, primary)
    meta_description = fit_meta_description(copy.meta_description, doc, primary)
    slug = make_slug(primary, title)
    facts = analyse_keywords(
        doc,
        request.keywords,
        title=title,
        meta_title=meta_title,
        meta_description=meta_description,
        slug=slug,
        heading_list=heading_list,
    )
    score = seo_score(
        facts,
        meta_title=meta_title,
        meta_description=meta_description,
        heading_list=heading_list,
        word_total=word_total,
        word_band=request.word_band,
        flesch=flesch,
        link_count=len(link_list),
    )
    report = assess(
        doc,
        heading_list,
        word_total,
        request.word_band,
        keywords=request.keywords,
        flesch=flesch,
    )
    related = semantic_keywords(
        request, research.get("semantic_keywords", []), copy.semantic_keywords
    )
    faq = faq_entries(doc)
    og_tags, twitter_tags = social_tags(
        title=meta_title, description=meta_description, slug=slug, keywords=request.keywords
    )
    quality_dimensions: dict[str, float] = {}
    quality_score: float | None = None
    if request.use_quality_scoring:
        quality_dimensions = dimensions(
            report,
            flesch=flesch,
            seo=score,
            word_total=word_total,
            band=request.word_band,
            citations_expected=request.use_citations and bool(citations),
            keyword_count=len(request.keywords),
        )
        quality_score = overall(quality_dimensions)
    article: dict[str, Any] = {
        "title": title,
        "content": doc.markdown,
        "meta_title": meta_title,
        "meta_description": meta_description,
        "readability_score": flesch,
        "seo_score": score,
        "citations": citations,
        "internal_links": internal_links(request, link_list, related),
        "quality_score": quality_score,
        "quality_dimensions": quality_dimensions,
        "semantic_keywords": related,
        "success": True,
        "seo_metadata": {
            "slug": slug,
            "focus_keyword": primary,
            "secondary_keywords": list(request.keywords[1:]),
            "search_intent": research.get("search_intent", "informational"),
            "og_tags": og_tags,
            "twitter_tags": twitter_tags,
            "keyword_analysis": facts.as_json(),
            "meta_title_length": len(meta_title),
            "meta_description_length": len(meta_description),
        },
        "structured_data": blog_posting(
            headline=title,
            description=meta_description,
            keywords=[*request.keywords, *related],
            word_count=word_total,
            sections=[
                h.text
                for h in heading_list
                if h.level == 2 and h.text != REFERENCES_HEADING and not is_faq_heading(h.text)
            ],
            slug=slug,
            faq=faq,
            author=author,
            publisher=publisher,
        ),
        "content_metadata": {
            "headings": _heading_json(heading_list),
            "links": link_list,
            "word_count": word_total,
            "reading_time": reading_time(word_total),
            "paragraph_count": len(doc.paragraphs),
            "has_tables": doc.has_table,
            "has_lists": doc.has_list,
        },
    }
    return article, [f"Quality check: {issue}" for issue in report.issues]
