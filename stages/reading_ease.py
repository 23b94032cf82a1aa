"""Flesch reading ease, the figure ``textstat.flesch_reading_ease`` gives, computed faster.

textstat (pinned at 0.7.8) looks up the syllables of every word of a text on every
call: a CMU dictionary entry, else pyphen's hyphenation. Articles repeat most of their
words, so here the syllables of each distinct word are looked up once (and kept across
texts). The rest is textstat's own code: the same word list, sentence and word counts,
formula and operation order, so the float is the same bit for bit. This is the only
module that knows textstat.
"""

from __future__ import annotations

from collections import Counter
from functools import lru_cache

from textstat.backend.counts import count_sentences, count_words
from textstat.backend.selections import list_words
from textstat.backend.utils import get_cmudict, get_lang_cfg, get_lang_root, get_pyphen

LANG = "en_US"
"""textstat's default language, which ``textstat.flesch_reading_ease`` uses."""


@lru_cache(maxsize=65536)
def _syllables(word: str) -> int:
    """textstat's syllable estimate for one lower-case word."""
    try:
        phones = get_cmudict(LANG)[word][0]  # type: ignore[index]
        return sum(1 for phone in phones if phone[-1].isdigit())
    except (TypeError, IndexError, KeyError):
        return len(get_pyphen(LANG).positions(word)) + 1


def flesch_reading_ease(text: str) -> float:
    """``textstat.flesch_reading_ease(text)`` (textstat's rounding is off by default)."""
    word_total = count_words(text)
    try:
        sentence_length = word_total / count_sentences(text)
    except ZeroDivisionError:
        sentence_length = 0.0
    try:
        counts = Counter(list_words(text, lowercase=True))
        syllables = sum(_syllables(word) * n for word, n in counts.items()) / word_total
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
