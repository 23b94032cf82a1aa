"""schema.org JSON-LD and social (Open Graph, Twitter) tags for an article."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from stages.markdown_doc import MarkdownDoc, plain_text

_FAQ_TITLE = re.compile(r"^(frequently asked questions|faqs?)\b", re.IGNORECASE)
_H2 = re.compile(r"^##\s")
_H3 = re.compile(r"^###\s+(.+?)\s*#*\s*$")


@dataclass(frozen=True)
class FaqEntry:
    """One question of the FAQ section and its plain-text answer."""

    question: str
    answer: str


def is_faq_heading(text: str) -> bool:
    """Whether a heading's text names a FAQ section."""
    return _FAQ_TITLE.match(text.strip()) is not None


def faq_entries(markdown: str | MarkdownDoc) -> list[FaqEntry]:
    """The H3 questions (with their answers) under a "Frequently Asked Questions" H2."""
    entries: list[FaqEntry] = []
    in_faq = False
    question: str | None = None
    answer: list[str] = []

    def flush() -> None:
        if question and answer:
            entries.append(FaqEntry(question, plain_text("\n\n".join(answer))))

    for block in MarkdownDoc.of(markdown).blocks:
        if _H2.match(block):
            flush()
            question, answer = None, []
            in_faq = is_faq_heading(block.lstrip("#").strip())
            continue
        if not in_faq:
            continue
        heading = _H3.match(block)
        if heading:
            flush()
            question, answer = plain_text(heading.group(1)).rstrip("."), []
        elif question:
            answer.append(block)
    flush()
    return entries


def blog_posting(
    *,
    headline: str,
    description: str,
    keywords: Sequence[str],
    word_count: int,
    sections: Sequence[str],
    slug: str,
    language: str = "en",
    faq: Sequence[FaqEntry] = (),
    published: datetime | None = None,
    author: str = "blogpipe",
    publisher: str = "blogpipe",
) -> dict[str, Any]:
    """A ``BlogPosting`` JSON-LD document; a ``FAQPage`` is attached as ``hasPart``."""
    stamp = (published or datetime.now(UTC)).isoformat(timespec="seconds")
    document: dict[str, Any] = {
        "@context": "https://schema.org",
        "@type": "BlogPosting",
        "headline": headline[:110],
        "description": description,
        "keywords": ", ".join(keywords),
        "wordCount": word_count,
        "articleSection": list(sections),
        "inLanguage": language,
        "datePublished": stamp,
        "dateModified": stamp,
        "mainEntityOfPage": {"@type": "WebPage", "@id": f"#{slug}"},
        "author": {"@type": "Person", "name": author},
        "publisher": {"@type": "Organization", "name": publisher},
    }
    if faq:
        document["hasPart"] = faq_page(faq)
    return document


def faq_page(faq: Sequence[FaqEntry]) -> dict[str, Any]:
    """A ``FAQPage`` with one ``Question``/``Answer`` per entry."""
    return {
        "@context": "https://schema.org",
        "@type": "FAQPage",
        "mainEntity": [
            {
                "@type": "Question",
                "name": entry.question,
                "acceptedAnswer": {"@type": "Answer", "text": entry.answer},
            }
            for entry in faq
        ],
    }


def social_tags(
    *, title: str, description: str, slug: str, keywords: Sequence[str]
) -> tuple[dict[str, Any], dict[str, str]]:
    """Open Graph and Twitter card tags (the URL is the slug; the site adds its origin)."""
    og = {
        "og:type": "article",
        "og:title": title,
        "og:description": description,
        "og:url": f"/{slug}",
        "article:tag": list(keywords),
    }
    twitter = {
        "twitter:card": "summary_large_image",
        "twitter:title": title,
        "twitter:description": description,
    }
    return og, twitter
