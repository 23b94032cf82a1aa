"""Reading an article's Markdown: headings, links, paragraphs, plain text, word counts.

Pure functions over a string; enough Markdown for what the LLM writes (ATX headings,
paragraphs, lists, pipe tables, fenced code, links), not a full CommonMark parser.
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass

WORDS_PER_MINUTE = 230

_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
_LINK = re.compile(r"(?<!!)\[([^\]\n]+)\]\(\s*(<[^>]+>|[^)\s]+)(?:\s+\"[^\"]*\")?\s*\)")
_IMAGE = re.compile(r"!\[([^\]\n]*)\]\([^)]*\)")
_URL = re.compile(r"(?:https?://|www\.)[^\s)>\]]+")
CITATION = re.compile(r"\[(\d{1,3}(?:\s*,\s*\d{1,3})*)\]")
_LIST_ITEM = re.compile(r"^\s*(?:[-*+]|\d{1,3}[.)])\s+")
_TABLE_SEPARATOR = re.compile(r"^\s*\|?\s*:?-{3,}:?\s*(?:\|\s*:?-{3,}:?\s*)*\|?\s*$")
_WORD = re.compile(r"[^\W_]+(?:['’-][^\W_]+)*", re.UNICODE)


@dataclass(frozen=True)
class Heading:
    """An ATX heading with its anchor id."""

    level: int
    text: str
    id: str


@dataclass(frozen=True)
class Link:
    """A Markdown link ``[text](url)``."""

    text: str
    url: str


def slugify(text: str, max_length: int | None = None) -> str:
    """Lowercase ASCII words joined by hyphens (accents folded, everything else dropped)."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    if max_length is not None and len(slug) > max_length:
        slug = (
            slug[:max_length].rsplit("-", 1)[0] if "-" in slug[:max_length] else slug[:max_length]
        )
    return slug.strip("-")


def inline_text(text: str) -> str:
    """Inline Markdown to plain text: links to their text, emphasis and code marks dropped."""
    text = _IMAGE.sub(r"\1", text)
    text = _LINK.sub(r"\1", text)
    text = re.sub(r"(\*\*|__|\*|_|`|~~)(?=\S)(.+?)(?<=\S)\1", r"\2", text)
    return re.sub(r"<[^>]+>", "", text).strip()


def _content_lines(markdown: str) -> list[tuple[str, bool]]:
    """Each line with a flag telling whether it sits inside a fenced code block."""
    lines: list[tuple[str, bool]] = []
    in_fence = False
    for line in markdown.splitlines():
        if _FENCE.match(line):
            in_fence = not in_fence
            lines.append((line, True))
            continue
        lines.append((line, in_fence))
    return lines


def headings(markdown: str) -> list[Heading]:
    """Every heading outside code blocks, with unique GitHub-style ids."""
    found: list[Heading] = []
    used: set[str] = set()
    for line, in_code in _content_lines(markdown):
        match = None if in_code else _HEADING.match(line)
        if not match:
            continue
        text = inline_text(CITATION.sub("", match.group(2))).strip()
        base = slugify(text) or "section"
        anchor, suffix = base, 1
        while anchor in used:
            anchor = f"{base}-{suffix}"
            suffix += 1
        used.add(anchor)
        found.append(Heading(level=len(match.group(1)), text=text, id=anchor))
    return found


def links(markdown: str) -> list[Link]:
    """Every Markdown link (not images) outside code blocks."""
    found: list[Link] = []
    for line, in_code in _content_lines(markdown):
        if in_code:
            continue
        for match in _LINK.finditer(line):
            found.append(Link(text=inline_text(match.group(1)), url=match.group(2).strip("<>")))
    return found


def blocks(markdown: str) -> list[str]:
    """Blank-line separated blocks outside code (headings are blocks of their own)."""
    result: list[str] = []
    current: list[str] = []
    for line, in_code in _content_lines(markdown):
        if in_code or not line.strip() or _HEADING.match(line):
            if current:
                result.append("\n".join(current))
                current = []
            if not in_code and _HEADING.match(line):
                result.append(line)
            continue
        current.append(line)
    if current:
        result.append("\n".join(current))
    return result


def paragraphs(markdown: str) -> list[str]:
    """Prose paragraphs: blocks that are not headings, lists, tables or quotes."""
    return [
        block
        for block in blocks(markdown)
        if not _HEADING.match(block)
        and not _LIST_ITEM.match(block)
        and not block.lstrip().startswith(("|", ">", "<"))
    ]


def has_table(markdown: str) -> bool:
    """Whether there is a pipe table (a header row followed by a separator row)."""
    lines = [line for line, in_code in _content_lines(markdown) if not in_code]
    return any(
        "|" in lines[i] and _TABLE_SEPARATOR.match(lines[i + 1]) is not None
        for i in range(len(lines) - 1)
    )


def has_list(markdown: str) -> bool:
    """Whether there is a bulleted or numbered list."""
    return any(not in_code and _LIST_ITEM.match(line) for line, in_code in _content_lines(markdown))


def plain_text(markdown: str) -> str:
    """Prose for counting and readability: no code, URLs, citation marks or Markdown syntax."""
    out: list[str] = []
    for line, in_code in _content_lines(markdown):
        if in_code or _TABLE_SEPARATOR.match(line):
            continue
        heading = _HEADING.match(line)
        if heading:
            # A heading reads as its own sentence.
            text = heading.group(2).rstrip(".:?!")
            out.append(f"{text}.")
            continue
        line = _LIST_ITEM.sub("", line).lstrip("> ")
        line = line.replace("|", " ")
        out.append(line)
    text = inline_text("\n".join(out))
    text = _URL.sub("", text)
    text = CITATION.sub("", text)
    text = re.sub(r"[ \t]+([.,;:!?])", r"\1", text)
    return re.sub(r"[ \t]+", " ", text).strip()


def words(text: str) -> list[str]:
    """Words of plain text (letters and digits, inner apostrophes and hyphens kept)."""
    return _WORD.findall(text)


def word_count(markdown: str) -> int:
    """Words of the article as a reader sees them."""
    return len(words(plain_text(markdown)))


def reading_time(word_total: int) -> int:
    """Minutes to read, at least one."""
    return max(1, math.ceil(word_total / WORDS_PER_MINUTE))
