"""Turning the draft's ``[n]`` markers into a consistent, numbered reference list.

The draft cites research sources by their number. Here the cited sources are
renumbered by first use, markers that point at no source are removed (with a
warning), and a ``## References`` section listing exactly the cited sources is
appended, so every marker resolves and every reference is used.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from stages.markdown_doc import CITATION, SPACE_BEFORE_MARK, inline_text

REFERENCES_HEADING = "References"
_REFERENCE_HEADINGS = re.compile(
    r"^#{2,3}\s+(references|sources|bibliography|works cited)\s*$", re.IGNORECASE | re.MULTILINE
)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_BLANK_RUN = re.compile(r"[ \t]{2,}")
_BLANK_MARK = re.compile(r"[ \t]([.,;:!?])")
"""A space or tab before a mark; text without tabs uses ``SPACE_BEFORE_MARK``, whose
literal first makes the search about 4x faster than trying the class at every character."""


@dataclass(frozen=True)
class CitedContent:
    """Markdown with a reference list, the citations it holds, and what was fixed."""

    markdown: str
    citations: list[dict[str, Any]]
    warnings: list[str]


def _reference_heading(markdown: str) -> re.Match[str] | None:
    """``_REFERENCE_HEADINGS.search(markdown)``, tried only where a line starts with ``#``
    (found with ``str.find``, which jumps; the search tries the multi-line ``^`` at every
    character)."""
    if markdown.startswith("#"):
        match = _REFERENCE_HEADINGS.match(markdown)
        if match:
            return match
    newline = markdown.find("\n#")
    while newline != -1:
        match = _REFERENCE_HEADINGS.match(markdown, newline + 1)
        if match:
            return match
        newline = markdown.find("\n#", newline + 1)
    return None


def _drop_reference_section(markdown: str) -> str:
    """Remove a reference list the writer added on its own (we build our own)."""
    match = _reference_heading(markdown)
    if not match:
        return markdown
    rest = markdown[match.end() :]
    next_heading = re.search(r"^#{1,2}\s", rest, re.MULTILINE)
    tail = rest[next_heading.start() :] if next_heading else ""
    return markdown[: match.start()].rstrip() + ("\n\n" + tail if tail else "\n")


def _citing_sentence(markdown: str, marker_start: int) -> str:
    """The plain-text sentence around a marker, for the citation's ``text``."""
    start = markdown.rfind("\n", 0, marker_start) + 1
    end = markdown.find("\n", marker_start)
    line = markdown[start : end if end != -1 else len(markdown)]
    offset = marker_start - start
    sentences = _SENTENCE_END.split(line)
    position = 0
    for sentence in sentences:
        position += len(sentence) + 1
        if position > offset:
            text = inline_text(CITATION.sub("", sentence))
            return re.sub(r"\s+([.,;:!?])", r"\1", text).strip()[:300]
    return inline_text(CITATION.sub("", line)).strip()[:300]


def _tidy_blanks(text: str) -> str:
    """Runs of two or more blanks as one space, and no blanks before punctuation."""
    if "  " in text or "\t" in text:
        text = _BLANK_RUN.sub(" ", text)
    # Every run of blanks is now a single space or tab, so deleting the blank before a
    # mark is what deleting the whole run would be. One regex search finds whether there
    # is any (a scan per blank and mark, twelve in all, cost more on a whole article).
    blank_mark = _BLANK_MARK if "\t" in text else SPACE_BEFORE_MARK
    if blank_mark.search(text):
        text = blank_mark.sub(r"\1", text)
    return text


def apply_citations(
    markdown: str, sources: Sequence[Mapping[str, Any]], *, enabled: bool
) -> CitedContent:
    """Renumber markers by first use, drop unresolvable ones, append the reference list."""
    markdown = _drop_reference_section(markdown)
    numbering: dict[int, int] = {}
    first_use: dict[int, int] = {}
    dropped: set[str] = set()

    def renumber(match: re.Match[str]) -> str:
        kept: list[str] = []
        for part in match.group(1).split(","):
            original = int(part)
            if not enabled or not 1 <= original <= len(sources):
                dropped.add(part.strip())
                continue
            if original not in numbering:
                numbering[original] = len(numbering) + 1
                first_use[original] = match.start()
            kept.append(str(numbering[original]))
        return "".join(f"[{n}]" for n in dict.fromkeys(kept))

    rewritten = _tidy_blanks(CITATION.sub(renumber, markdown))
    warnings: list[str] = []
    if dropped and enabled:
        warnings.append(
            f"Removed citation markers that matched no source: {', '.join(sorted(dropped))}"
        )
    citations: list[dict[str, Any]] = []
    for original, number in sorted(numbering.items(), key=lambda item: item[1]):
        source = sources[original - 1]
        citations.append(
            {
                "text": _citing_sentence(markdown, first_use[original]),
                "url": str(source.get("url", "")),
                "title": str(source.get("title", "")),
                "number": number,
            }
        )
    if citations:
        lines = [f"{c['number']}. [{c['title']}]({c['url']})" for c in citations]
        rewritten = (
            rewritten.rstrip() + f"\n\n## {REFERENCES_HEADING}\n\n" + "\n".join(lines) + "\n"
        )
    elif enabled and sources:
        warnings.append("The draft cites none of the research sources")
    return CitedContent(markdown=rewritten, citations=citations, warnings=warnings)
