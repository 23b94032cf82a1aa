"""Reading an article's Markdown: headings, links, paragraphs, plain text, word counts.

Pure functions over a string; enough Markdown for what the LLM writes (ATX headings,
paragraphs, lists, pipe tables, fenced code, links), not a full CommonMark parser.
``MarkdownDoc`` derives each of them once, for the many checks that read one article.
Cheap substring tests skip a regular expression where it cannot match: the regexes
scan every character, and most articles have no code, images or raw HTML.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property, lru_cache

WORDS_PER_MINUTE = 230

_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
# "[" not preceded by "!" (an image); the look-behind follows the literal "[" so that
# the search can jump from one "[" to the next.
_LINK = re.compile(r"\[(?<!!\[)([^\]\n]+)\]\(\s*(<[^>]+>|[^)\s]+)(?:\s+\"[^\"]*\")?\s*\)")
_IMAGE = re.compile(r"!\[([^\]\n]*)\]\([^)]*\)")
_URL = re.compile(r"(?:https?://|www\.)[^\s)>\]]+")
CITATION = re.compile(r"\[(\d{1,3}(?:\s*,\s*\d{1,3})*)\]")
_LIST_ITEM = re.compile(r"^\s*(?:[-*+]|\d{1,3}[.)])\s+")
_TABLE_SEPARATOR = re.compile(r"^\s*\|?\s*:?-{3,}:?\s*(?:\|\s*:?-{3,}:?\s*)*\|?\s*$")
_WORD = re.compile(r"[^\W_]+(?:['’-][^\W_]+)*", re.UNICODE)
_EMPHASIS = re.compile(r"(\*\*|__|\*|_|`|~~)(?=\S)(.+?)(?<=\S)\1")
_TAG = re.compile(r"<[^>]+>")
_NOT_SLUG = re.compile(r"[^a-z0-9]+")
_BLANKS = re.compile(r"[ \t]{2,}|\t")
"""Runs of blanks that are not already a single space."""
SPACE_BEFORE_MARK = re.compile(r" ([.,;:!?])")
"""A space before a mark (``.,;:!?``); the literal space first lets a search jump from one
space to the next."""


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
    slug = _NOT_SLUG.sub("-", ascii_text.lower()).strip("-")
    if max_length is not None and len(slug) > max_length:
        slug = (
            slug[:max_length].rsplit("-", 1)[0] if "-" in slug[:max_length] else slug[:max_length]
        )
    return slug.strip("-")


def inline_text(text: str) -> str:
    """Inline Markdown to plain text: links to their text, emphasis and code marks dropped."""
    if "](" in text:
        if "![" in text:
            text = _IMAGE.sub(r"\1", text)
        text = _LINK.sub(r"\1", text)
    if "*" in text or "_" in text or "`" in text or "~~" in text:
        text = _EMPHASIS.sub(r"\2", text)
    if "<" in text:
        text = _TAG.sub("", text)
    return text.strip()


Lines = Sequence[tuple[str, bool]]
"""Lines of Markdown, each with whether it sits inside a fenced code block."""


def _may_have_fences(markdown: str) -> bool:
    """Whether a code fence could start anywhere (cheap: two substring tests)."""
    return "```" in markdown or "~~~" in markdown


def _content_lines(markdown: str) -> list[tuple[str, bool]]:
    """Each line with a flag telling whether it sits inside a fenced code block."""
    if not _may_have_fences(markdown):
        return [(line, False) for line in markdown.splitlines()]
    lines: list[tuple[str, bool]] = []
    in_fence = False
    for line in markdown.splitlines():
        if _FENCE.match(line):
            in_fence = not in_fence
            lines.append((line, True))
            continue
        lines.append((line, in_fence))
    return lines


def _heading(line: str) -> tuple[int, str] | None:
    """The level and text of an ATX heading (``_HEADING``), or None.

    The usual heading (one space after the marks, text that neither starts with a blank
    nor ends with a blank or a ``#``, a single line) is read with string methods: that is
    where the regex's lazy text group stops, and it costs the regex a few microseconds
    per heading, of which every article has dozens, read several times over. Anything
    else goes to the regex itself."""
    if not line.startswith("#"):
        return None
    level = len(line) - len(line.lstrip("#"))
    if level <= 6 and line[level : level + 1] == " " and "\n" not in line:
        text = line[level + 1 :]
        if text and not text[0].isspace() and not text[-1].isspace() and text[-1] != "#":
            return level, text
    match = _HEADING.match(line)
    return (len(match.group(1)), match.group(2)) if match else None


def _headings(lines: Lines) -> list[Heading]:
    found: list[Heading] = []
    used: set[str] = set()
    for line, in_code in lines:
        heading = None if in_code else _heading(line)
        if heading is None:
            continue
        level, raw = heading
        text = inline_text(CITATION.sub("", raw)).strip()
        base = slugify(text) or "section"
        anchor, suffix = base, 1
        while anchor in used:
            anchor = f"{base}-{suffix}"
            suffix += 1
        used.add(anchor)
        found.append(Heading(level=level, text=text, id=anchor))
    return found


def headings(markdown: str) -> list[Heading]:
    """Every heading outside code blocks, with unique GitHub-style ids."""
    return _headings(_content_lines(markdown))


def _links(lines: Lines) -> list[Link]:
    found: list[Link] = []
    for line, in_code in lines:
        if in_code or "](" not in line:
            continue
        for match in _LINK.finditer(line):
            found.append(Link(text=inline_text(match.group(1)), url=match.group(2).strip("<>")))
    return found


def links(markdown: str) -> list[Link]:
    """Every Markdown link (not images) outside code blocks."""
    return _links(_content_lines(markdown))


def _blocks(lines: Lines) -> list[str]:
    result: list[str] = []
    current: list[str] = []
    for line, in_code in lines:
        heading = not in_code and _heading(line) is not None
        if in_code or heading or not line.strip():
            if current:
                result.append("\n".join(current))
                current = []
            if heading:
                result.append(line)
            continue
        current.append(line)
    if current:
        result.append("\n".join(current))
    return result


def blocks(markdown: str) -> list[str]:
    """Blank-line separated blocks outside code (headings are blocks of their own)."""
    return _blocks(_content_lines(markdown))


def _paragraphs(block_list: Sequence[str]) -> list[str]:
    return [
        block
        for block in block_list
        if _heading(block) is None
        and not _LIST_ITEM.match(block)
        and not block.lstrip().startswith(("|", ">", "<"))
    ]


def paragraphs(markdown: str) -> list[str]:
    """Prose paragraphs: blocks that are not headings, lists, tables or quotes."""
    return _paragraphs(blocks(markdown))


def _has_table(lines: Lines) -> bool:
    rows = [line for line, in_code in lines if not in_code]
    return any(
        "|" in rows[i] and _TABLE_SEPARATOR.match(rows[i + 1]) is not None
        for i in range(len(rows) - 1)
    )


def has_table(markdown: str) -> bool:
    """Whether there is a pipe table (a header row followed by a separator row)."""
    return _has_table(_content_lines(markdown))


def _has_list(lines: Lines) -> bool:
    return any(not in_code and _LIST_ITEM.match(line) for line, in_code in lines)


def has_list(markdown: str) -> bool:
    """Whether there is a bulleted or numbered list."""
    return _has_list(_content_lines(markdown))


def _plain_text(lines: Lines) -> str:
    return _prose_text([line for line, in_code in lines if not in_code])


def _prose_text(lines: Iterable[str]) -> str:
    """``_plain_text`` of the lines outside code."""
    out: list[str] = []
    for line in lines:
        first = line[:1]
        if not first or (first.isalpha() and "|" not in line):
            # Most lines: blank, or prose (a heading, list item, quote or table row cannot
            # start with a letter, nor can a table separator): nothing to strip.
            out.append(line)
            continue
        if "---" in line and _TABLE_SEPARATOR.match(line):
            continue
        heading = _heading(line)
        if heading:
            # A heading reads as its own sentence.
            text = heading[1].rstrip(".:?!")
            out.append(f"{text}.")
            continue
        item = _LIST_ITEM.match(line)
        if item:
            line = line[item.end() :]
        line = line.lstrip("> ")
        if "|" in line:
            line = line.replace("|", " ")
        out.append(line)
    text = inline_text("\n".join(out))
    if "://" in text or "www." in text:
        text = _URL.sub("", text)
    if "[" in text:
        text = CITATION.sub("", text)
    # Same as deleting blank runs before a mark, then making every run one space.
    if "\t" in text or "  " in text:
        text = _BLANKS.sub(" ", text)
    # Each blank is now a single space: dropping the ones before a mark in one pass is
    # what replacing " ." and then each other mark in turn would do (one regex search
    # instead of a scan of the whole text per mark).
    if SPACE_BEFORE_MARK.search(text):
        text = SPACE_BEFORE_MARK.sub(r"\1", text)
    return text.strip()


def plain_text(markdown: str) -> str:
    """Prose for counting and readability: no code, URLs, citation marks or Markdown syntax."""
    if not _may_have_fences(markdown):
        return _prose_text(markdown.splitlines())  # no code: no need to flag each line
    return _plain_text(_content_lines(markdown))


def words(text: str) -> list[str]:
    """Words of plain text (letters and digits, inner apostrophes and hyphens kept)."""
    return _WORD.findall(text)


TOKEN_EDGE = '.,;:!?"()[]'
"""Punctuation that is neither a letter, digit, ``_`` nor a word joiner (``'’-``)."""


_ASCII_CLASSES = bytes(
    ord("a") if chr(code).isalnum() else ord("j") if chr(code) in "'-" else ord(" ")
    for code in range(256)
)
"""ASCII bytes to their class for ``word_total``: ``a`` a letter or digit, ``j`` a word
joiner (``'`` or ``-``), a blank for anything else (``_`` included, as in ``_WORD``)."""


def word_total(text: str) -> int:
    """``len(words(text))``, without running the word regex over the text.

    ASCII text (the usual case) is mapped to classes (``_ASCII_CLASSES``) and counted in
    C: a word starts at each run of letters and digits that does not follow exactly one
    joiner after another run, that is a run after a blank (``" a"``), after two
    joiners in a row (``"jja"``), after a joiner after a blank (``" ja"``), or at the
    start (``"a"``, ``"ja"``). Those byte pairs and triples cannot overlap themselves,
    so ``bytes.count`` counts every one.

    Other text is counted per whitespace token (a word never spans whitespace): a token
    that is all letters and digits (``str.isalnum``, the regex's own class), once
    punctuation that cannot join words is stripped off its ends, is exactly one word.
    """
    if text.isascii():
        marks = text.encode("ascii").translate(_ASCII_CLASSES)
        return (
            marks.count(b" a")
            + marks.count(b"jja")
            + marks.count(b" ja")
            + marks.startswith(b"a")
            + marks.startswith(b"ja")
        )
    total = 0
    for token in text.split():
        if token.isalnum() or token.strip(TOKEN_EDGE).isalnum():
            total += 1
        else:
            total += len(_WORD.findall(token))
    return total


def word_count(markdown: str) -> int:
    """Words of the article as a reader sees them."""
    return word_total(plain_text(markdown))


@lru_cache(maxsize=256)
def phrase_pattern(phrase: str) -> re.Pattern[str] | None:
    """Whole-word, any-separator matcher of a phrase in lower-case text (None: no words)."""
    tokens = words(phrase.lower())
    if not tokens:
        return None
    first = re.escape(tokens[0])
    # "Not after a word character", checked after the first token so that the search
    # can jump between occurrences of that literal.
    head = first + rf"(?<!\w{first})"
    return re.compile(head + "".join(r"[\W_]+" + re.escape(t) for t in tokens[1:]) + r"(?![\w])")


@dataclass(frozen=True)
class MarkdownDoc:
    """An article's Markdown with what the checks read from it, each derived once."""

    markdown: str
    _phrase_counts: dict[str, int] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    @classmethod
    def of(cls, markdown: str | MarkdownDoc) -> MarkdownDoc:
        """``markdown`` as a document (itself when it already is one)."""
        return markdown if isinstance(markdown, MarkdownDoc) else cls(markdown)

    @cached_property
    def lines(self) -> tuple[tuple[str, bool], ...]:
        """Each line with whether it sits inside a fenced code block."""
        return tuple(_content_lines(self.markdown))

    @cached_property
    def headings(self) -> tuple[Heading, ...]:
        """Every heading outside code blocks, with unique ids."""
        return tuple(_headings(self.lines))

    @cached_property
    def links(self) -> tuple[Link, ...]:
        """Every Markdown link outside code blocks."""
        return tuple(_links(self.lines))

    @cached_property
    def blocks(self) -> tuple[str, ...]:
        """Blank-line separated blocks outside code."""
        return tuple(_blocks(self.lines))

    @cached_property
    def paragraphs(self) -> tuple[str, ...]:
        """Prose paragraphs."""
        return tuple(_paragraphs(self.blocks))

    @cached_property
    def has_table(self) -> bool:
        """Whether there is a pipe table."""
        return _has_table(self.lines)

    @cached_property
    def has_list(self) -> bool:
        """Whether there is a bulleted or numbered list."""
        return _has_list(self.lines)

    @cached_property
    def plain_text(self) -> str:
        """Prose for counting and readability."""
        return _plain_text(self.lines)

    @cached_property
    def word_count(self) -> int:
        """Words of the plain text."""
        return word_total(self.plain_text)

    @cached_property
    def lower_text(self) -> str:
        """The plain text in lower case, for phrase counts."""
        return self.plain_text.lower()

    def forget_lines(self) -> None:
        """Drop the per-line view: the largest of the derived values (a tuple for each
        line) and the cheapest to derive again (about 16 µs an article). For a document
        kept through a long wait, such as an LLM call, with thousands waiting at once."""
        self.__dict__.pop("lines", None)

    def phrase_count(self, phrase: str) -> int:
        """Case-insensitive whole-word occurrences of ``phrase`` in the plain text."""
        count = self._phrase_counts.get(phrase)
        if count is None:
            pattern = phrase_pattern(phrase)
            count = len(pattern.findall(self.lower_text)) if pattern else 0
            self._phrase_counts[phrase] = count
        return count


def reading_time(word_total: int) -> int:
    """Minutes to read, at least one."""
    return max(1, math.ceil(word_total / WORDS_PER_MINUTE))
