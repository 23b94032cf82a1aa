"""Quality checks of a finished article and the scores derived from them."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from stages.citations import REFERENCES_HEADING
from stages.markdown_doc import CITATION, TOKEN_EDGE, Heading, MarkdownDoc

# The look-ahead names the first letters of the phrases after "\b", so that the match is
# tried at few word boundaries (case-insensitive regexes get no faster search).
_BOILERPLATE = re.compile(
    r"\b(?=[aimlth])(?:as an ai\b|as a(?:n ai)? language model\b|i(?:'m| am) (?:sorry|unable)\b|"
    r"i cannot (?:help|assist|provide)\b|my knowledge cutoff\b|lorem ipsum\b|"
    r"todo:|here is (?:the|your) (?:article|blog post)\b)|\[insert\b",
    re.IGNORECASE,
)
_REFERENCE_ITEM = re.compile(r"^\s*(\d{1,3})[.)]\s+", re.MULTILINE)
_REFERENCES = re.compile(rf"^##\s+{REFERENCES_HEADING}\s*$", re.MULTILINE)
_WORD_RUN = re.compile(r"\w+")
MIN_READING_EASE = 30.0
"""Flesch reading ease below this is "very difficult" (academic papers)."""


@dataclass(frozen=True)
class QualityReport:
    """Issues found, one list per concern."""

    citations: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    boilerplate: list[str] = field(default_factory=list)
    length: list[str] = field(default_factory=list)
    structure: list[str] = field(default_factory=list)
    keywords: list[str] = field(default_factory=list)
    readability: list[str] = field(default_factory=list)

    @property
    def issues(self) -> list[str]:
        """Every issue, in a stable order."""
        return (
            self.citations
            + self.duplicates
            + self.boilerplate
            + self.length
            + self.structure
            + self.keywords
            + self.readability
        )


def _split_references(markdown: str) -> tuple[str, str]:
    """Body and reference list (empty when there is none)."""
    match = _REFERENCES.search(markdown) if REFERENCES_HEADING in markdown else None
    if not match:
        return markdown, ""
    return markdown[: match.start()], markdown[match.end() :]


def check_citations(markdown: str) -> list[str]:
    """Every ``[n]`` resolves to a reference, and every reference is cited."""
    body, references = _split_references(markdown)
    cited = {int(n) for match in CITATION.finditer(body) for n in match.group(1).split(",")}
    listed = {int(n) for n in _REFERENCE_ITEM.findall(references)}
    issues = [f"citation [{n}] has no reference" for n in sorted(cited - listed)]
    issues += [f"reference {n} is never cited" for n in sorted(listed - cited)]
    return issues


_ASCII_RUN_BREAKS = bytes(
    code if chr(code).isalnum() or chr(code) == "_" else ord(" ") for code in range(256)
)
"""ASCII bytes with every one that is not a word character (``\\w``) made a blank."""


def normalise_paragraph(paragraph: str) -> str:
    """Lowercase words only, without citation markers: what "the same paragraph" means."""
    if "[" in paragraph:
        paragraph = CITATION.sub("", paragraph)
    if paragraph.isascii():
        # The word runs of ASCII text are its runs of letters, digits and "_".
        return b" ".join(
            paragraph.encode("ascii").lower().translate(_ASCII_RUN_BREAKS).split()
        ).decode("ascii")
    # The word runs joined by one space (what replacing the other runs by a space and
    # stripping gives). Runs never span whitespace, and a token that is all letters and
    # digits once punctuation is stripped off its ends is one run: no regex needed.
    runs: list[str] = []
    for token in paragraph.lower().split():
        if token.isalnum():
            runs.append(token)
        elif (core := token.strip(TOKEN_EDGE)).isalnum():
            runs.append(core)
        else:
            runs += _WORD_RUN.findall(token)
    return " ".join(runs)


# Characters that are never word characters (``\w``: letters, digits, ``_``): every other
# ASCII one, and the typographic punctuation articles use.
_NOT_WORD = str.maketrans(
    "",
    "",
    "".join(c for c in map(chr, range(128)) if not (c.isalnum() or c == "_"))
    + "\u00a0\u2013\u2014\u2018\u2019\u201c\u201d\u2026\u00ab\u00bb",
)


def _word_chars(paragraph: str) -> str:
    """``normalise_paragraph(paragraph)`` without its spaces: equal for any two paragraphs
    that normalise alike. A deletion table instead of a word scan, unless a character
    the table does not know is left over."""
    text = CITATION.sub("", paragraph) if "[" in paragraph else paragraph
    chars = text.lower().translate(_NOT_WORD)
    if chars.isascii() or chars.replace("_", "").isalnum():
        return chars
    return normalise_paragraph(paragraph).replace(" ", "")


def check_duplicates(markdown: str | MarkdownDoc, min_chars: int = 40) -> list[str]:
    """Paragraphs that appear more than once (ignoring case, punctuation and markers)."""
    paragraphs = MarkdownDoc.of(markdown).paragraphs
    # Only paragraphs that share their word characters with another can normalise alike.
    keys = [_word_chars(p) for p in paragraphs]
    shared = Counter(keys)
    counts = Counter(
        text
        for text in (
            normalise_paragraph(p)
            for p, key in zip(paragraphs, keys, strict=True)
            if shared[key] > 1
        )
        if len(text) >= min_chars
    )
    return [f"duplicate paragraph ({n}x): {text[:60]}…" for text, n in counts.items() if n > 1]


# Each phrase ``_BOILERPLATE`` matches contains one of these, in ASCII lower case.
_BOILERPLATE_NEEDLES = (
    "as an ai",
    "as a language model",
    "i'm sorry",
    "i am sorry",
    "i'm unable",
    "i am unable",
    "i cannot ",
    "knowledge cutoff",
    "lorem ipsum",
    "todo:",
    "here is the ",
    "here is your ",
    "[insert",
)


_ASCII_CASE_TWINS = "\u0130\u0131\u017f\u212a"


def check_boilerplate(markdown: str) -> list[str]:
    """Phrases that betray an unedited LLM answer or a template."""
    # The regex walks every word; most articles contain none of its phrases, which plain
    # substring tests over the lower-cased text rule out far faster. Not when the text has
    # one of the four letters that IGNORECASE matches to an ASCII one (İ, ı, ſ, Kelvin K).
    if not any(letter in markdown for letter in _ASCII_CASE_TWINS):
        lowered = markdown.lower()
        if not any(needle in lowered for needle in _BOILERPLATE_NEEDLES):
            return []
    found = dict.fromkeys(match.group(0).lower() for match in _BOILERPLATE.finditer(markdown))
    return [f"boilerplate phrase: {phrase!r}" for phrase in found]


def check_length(word_total: int, band: tuple[int, int]) -> list[str]:
    """Whether the word count is inside the requested band."""
    low, high = band
    if word_total < low:
        return [f"article has {word_total} words, below the requested {low}-{high}"]
    if word_total > high:
        return [f"article has {word_total} words, above the requested {low}-{high}"]
    return []


def check_structure(heading_list: Sequence[Heading]) -> list[str]:
    """One H1, at least two H2, no skipped heading levels, unique ids."""
    issues: list[str] = []
    h1 = sum(1 for h in heading_list if h.level == 1)
    if h1 != 1:
        issues.append(f"article has {h1} H1 headings, expected 1")
    if sum(1 for h in heading_list if h.level == 2) < 2:
        issues.append("article has fewer than two H2 sections")
    previous = 1
    for heading in heading_list:
        if heading.level > previous + 1:
            issues.append(f"heading level skipped before {heading.text!r}")
        previous = heading.level
    ids = [h.id for h in heading_list]
    if len(ids) != len(set(ids)):
        issues.append("heading ids are not unique")
    return issues


def check_keywords(markdown: str | MarkdownDoc, keywords: Sequence[str]) -> list[str]:
    """Every requested keyword appears in the article's text at least once."""
    doc = MarkdownDoc.of(markdown)
    return [
        f"keyword {k!r} does not appear in the article"
        for k in keywords
        if doc.phrase_count(k) == 0
    ]


def check_readability(flesch: float | None) -> list[str]:
    """The prose is not "very difficult" to read."""
    if flesch is None or flesch >= MIN_READING_EASE:
        return []
    return [f"reading ease {flesch:.0f} is below {MIN_READING_EASE:.0f} (very difficult)"]


def assess(
    markdown: str | MarkdownDoc,
    heading_list: Sequence[Heading],
    word_total: int,
    band: tuple[int, int],
    *,
    keywords: Sequence[str] = (),
    flesch: float | None = None,
) -> QualityReport:
    """Run every check."""
    doc = MarkdownDoc.of(markdown)
    return QualityReport(
        citations=check_citations(doc.markdown),
        duplicates=check_duplicates(doc),
        boilerplate=check_boilerplate(doc.markdown),
        length=check_length(word_total, band),
        structure=check_structure(heading_list),
        keywords=check_keywords(doc, keywords),
        readability=check_readability(flesch),
    )


def _length_score(word_total: int, band: tuple[int, int]) -> float:
    low, high = band
    if low <= word_total <= high:
        return 100.0
    distance = low - word_total if word_total < low else word_total - high
    return max(0.0, 100.0 - 100.0 * distance / low)


def dimensions(
    report: QualityReport,
    *,
    flesch: float,
    seo: float,
    word_total: int,
    band: tuple[int, int],
    citations_expected: bool,
    keyword_count: int = 1,
) -> dict[str, float]:
    """0-100 per dimension; the quality score is their mean."""
    citation_score = max(0.0, 100.0 - 25.0 * len(report.citations))
    if not citations_expected:
        citation_score = 100.0
    coverage = 100.0 * (1 - len(report.keywords) / keyword_count) if keyword_count else 100.0
    return {
        "length": round(_length_score(word_total, band), 1),
        "structure": max(0.0, 100.0 - 25.0 * len(report.structure)),
        "keyword_coverage": round(max(0.0, coverage), 1),
        "citations": citation_score,
        "readability": round(max(0.0, min(100.0, flesch)), 1),
        "duplicates": max(0.0, 100.0 - 30.0 * len(report.duplicates)),
        "boilerplate": max(0.0, 100.0 - 40.0 * len(report.boilerplate)),
        "seo": round(seo, 1),
    }


def overall(dimension_scores: dict[str, float]) -> float:
    """Mean of the dimensions, one decimal."""
    return (
        round(sum(dimension_scores.values()) / len(dimension_scores), 1)
        if dimension_scores
        else 0.0
    )
