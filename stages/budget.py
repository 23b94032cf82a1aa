"""Word budgets: how the requested length band is split over introduction, sections and FAQ."""

from __future__ import annotations

from core.requests import BlogRequest, Length

SECTION_COUNT: dict[Length, int] = {
    Length.short: 3,
    Length.medium: 5,
    Length.long: 7,
    Length.extended: 9,
}
FAQ_COUNT: dict[Length, int] = {
    Length.short: 3,
    Length.medium: 4,
    Length.long: 5,
    Length.extended: 5,
}
WORDS_PER_FAQ = 45
"""A question and a short answer."""
WORDS_PER_HEADING = 6
"""Headings and the reference list count as words too; leave room for them."""


def target_words(request: BlogRequest) -> int:
    """The article length aimed at: the middle of the requested band."""
    low, high = request.word_band
    return (low + high) // 2


def faq_words(request: BlogRequest, questions: int) -> int:
    """Words the FAQ will take (zero when not asked for)."""
    return WORDS_PER_FAQ * questions if request.include_faq_section else 0


def body_words(request: BlogRequest, sections: int, questions: int) -> int:
    """Words for introduction plus sections, after FAQ and headings are set aside."""
    overhead = WORDS_PER_HEADING * (sections + 3)
    budget = target_words(request) - faq_words(request, questions) - overhead
    return max(budget, request.word_band[0] // 2)


def scale_budgets(weights: list[int], total: int, minimum: int = 30) -> list[int]:
    """Scale positive weights to integers summing exactly to ``total``."""
    if not weights:
        return []
    clean = [max(1, weight) for weight in weights]
    minimum = min(minimum, total // len(clean))
    factor = total / sum(clean)
    scaled = [max(minimum, round(weight * factor)) for weight in clean]
    # Put the rounding error on the largest part so the sum is exact.
    largest = scaled.index(max(scaled))
    scaled[largest] += total - sum(scaled)
    return scaled
