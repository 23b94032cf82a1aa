"""Deterministic SEO facts about an article: snippet lengths, slug, keywords, score.

Everything here is computed from the Markdown and the request, never asked of the LLM.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from stages.markdown_doc import (
    Heading,
    MarkdownDoc,
    phrase_pattern,
    plain_text,
    slugify,
    word_total,
)
from stages.reading_ease import flesch_reading_ease

META_TITLE_MAX = 60
META_DESCRIPTION_MIN = 120
META_DESCRIPTION_MAX = 160
SLUG_MAX = 60
DENSITY_RANGE = (0.5, 3.0)
_SLUG_STOPWORDS = frozenset(
    "a an and are as at be by for from how in into is it of on or the to what why with your".split()
)


def readability(markdown: str | MarkdownDoc) -> float:
    """Flesch reading ease of the prose (Markdown, URLs and citation marks stripped)."""
    doc = MarkdownDoc.of(markdown)
    if not doc.word_count:
        return 0.0
    return round(float(flesch_reading_ease(doc.plain_text)), 1)


def _cut(text: str, limit: int, ellipsis: str = "") -> str:
    """``text`` cut at a word boundary so that it (plus ``ellipsis``) fits ``limit``."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    room = limit - len(ellipsis)
    cut = text[: room + 1].rsplit(" ", 1)[0] if " " in text[:room] else text[:room]
    return cut[:room].rstrip(" ,;:-–—") + ellipsis


def fit_meta_title(candidate: str, title: str, primary_keyword: str) -> str:
    """A meta title of at most 60 characters, containing the primary keyword when it fits."""
    for option in (candidate, title):
        option = " ".join(option.split())
        if option and len(option) <= META_TITLE_MAX and primary_keyword.lower() in option.lower():
            return option
    base = _cut(candidate or title, META_TITLE_MAX)
    if primary_keyword.lower() in base.lower():
        return base
    keyword = primary_keyword[:1].upper() + primary_keyword[1:]
    return _cut(f"{keyword}: {base}", META_TITLE_MAX)


def _join(first: str, second: str) -> str:
    """Two sentences as one text."""
    return f"{first.rstrip(' .')}. {second}" if first else second


def fit_meta_description(candidate: str, markdown: str | MarkdownDoc, primary_keyword: str) -> str:
    """A 120-160 character description with the keyword: the LLM's if it fits, else repaired."""
    text = " ".join(candidate.split())
    if len(text) < META_DESCRIPTION_MIN:
        opening = "\n\n".join(MarkdownDoc.of(markdown).paragraphs[:2])
        text = _join(text, " ".join(plain_text(opening).split()))
    if len(text) < META_DESCRIPTION_MIN:
        text = _join(text, f"A practical guide to {primary_keyword}: what it is and how to choose.")
    text = _cut(text, META_DESCRIPTION_MAX, "…")
    if count_phrase(text, primary_keyword) == 0:
        keyword = primary_keyword[:1].upper() + primary_keyword[1:]
        text = _cut(f"{keyword}: {text}", META_DESCRIPTION_MAX, "…")
    return text


def make_slug(primary_keyword: str, title: str) -> str:
    """Lowercase ASCII, hyphen-separated, at most 60 characters, starting with the keyword."""
    slug = slugify(primary_keyword, SLUG_MAX)
    present = set(slug.split("-"))
    extra = 0
    for word in slugify(title).split("-"):
        if extra == 3 or not word or word in present or word in _SLUG_STOPWORDS:
            continue
        if len(slug) + 1 + len(word) > SLUG_MAX:
            break
        slug = f"{slug}-{word}" if slug else word
        present.add(word)
        extra += 1
    return slug or "article"


def count_phrase(text: str, phrase: str) -> int:
    """Case-insensitive whole-word occurrences of ``phrase`` in ``text``."""
    pattern = phrase_pattern(phrase)
    return len(pattern.findall(text.lower())) if pattern else 0


def keyword_density(text: str, phrase: str) -> float:
    """Occurrences of ``phrase`` per 100 words of ``text``."""
    return _density(count_phrase(text, phrase), word_total(text))


@dataclass(frozen=True)
class KeywordFacts:
    """Where the primary keyword appears, and every keyword's count and density."""

    primary: str
    in_title: bool
    in_meta_title: bool
    in_meta_description: bool
    in_first_paragraph: bool
    in_headings: bool
    in_slug: bool
    density: float
    keywords: dict[str, dict[str, float]]

    def as_json(self) -> dict[str, Any]:
        """The ``seo_metadata.keyword_analysis`` object."""
        return {
            "primary_keyword": self.primary,
            "primary_keyword_density": self.density,
            "in_title": self.in_title,
            "in_meta_title": self.in_meta_title,
            "in_meta_description": self.in_meta_description,
            "in_first_paragraph": self.in_first_paragraph,
            "in_headings": self.in_headings,
            "in_slug": self.in_slug,
            "keywords": self.keywords,
        }


def _density(count: int, total: int) -> float:
    """Occurrences per 100 words (as ``keyword_density``)."""
    return round(100.0 * count / total, 2) if total else 0.0


def analyse_keywords(
    markdown: str | MarkdownDoc,
    keywords: Sequence[str],
    *,
    title: str,
    meta_title: str,
    meta_description: str,
    slug: str,
    heading_list: Sequence[Heading],
) -> KeywordFacts:
    """Keyword placement and density over the article's plain text."""
    doc = MarkdownDoc.of(markdown)
    total = doc.word_count
    primary = keywords[0]
    first = doc.paragraphs[:1]
    return KeywordFacts(
        primary=primary,
        in_title=count_phrase(title, primary) > 0,
        in_meta_title=count_phrase(meta_title, primary) > 0,
        in_meta_description=count_phrase(meta_description, primary) > 0,
        in_first_paragraph=bool(first) and count_phrase(plain_text(first[0]), primary) > 0,
        in_headings=any(count_phrase(h.text, primary) for h in heading_list if h.level > 1),
        in_slug=slugify(primary) in slug,
        density=_density(doc.phrase_count(primary), total),
        keywords={
            keyword: {
                "count": doc.phrase_count(keyword),
                "density": _density(doc.phrase_count(keyword), total),
            }
            for keyword in keywords
        },
    )


def seo_score(
    facts: KeywordFacts,
    *,
    meta_title: str,
    meta_description: str,
    heading_list: Sequence[Heading],
    word_total: int,
    word_band: tuple[int, int],
    flesch: float,
    link_count: int,
) -> float:
    """0-100 from weighted on-page checks (placement, lengths, structure, readability)."""
    low, high = DENSITY_RANGE
    h1 = sum(1 for h in heading_list if h.level == 1)
    h2 = sum(1 for h in heading_list if h.level == 2)
    checks: list[tuple[float, float]] = [
        (15, float(facts.in_title)),
        (10, float(facts.in_meta_title)),
        (10, float(facts.in_meta_description)),
        (10, float(facts.in_first_paragraph)),
        (10, float(facts.in_headings)),
        (10, 1.0 if low <= facts.density <= high else 0.5 if facts.density > 0 else 0.0),
        (5, float(len(meta_title) <= META_TITLE_MAX)),
        (5, float(META_DESCRIPTION_MIN <= len(meta_description) <= META_DESCRIPTION_MAX)),
        (10, float(word_band[0] <= word_total <= word_band[1])),
        (5, float(h1 == 1) * 0.5 + float(h2 >= 3) * 0.5),
        (5, max(0.0, min(1.0, flesch / 60.0))),
        (5, float(link_count > 0)),
    ]
    return round(sum(weight * value for weight, value in checks), 1)
