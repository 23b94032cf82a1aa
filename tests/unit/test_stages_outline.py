"""Outline normalisation: what code fixes in whatever outline the LLM returns."""

from __future__ import annotations

import pytest

from core.errors import RetryableError
from core.requests import BlogRequest, Length
from stages.budget import scale_budgets
from stages.models import Outline, OutlineSection, OutlineSubsection
from stages.outline import normalise_outline, planned_words


def _outline(sections: int, words: int, faq: list[str]) -> Outline:
    return Outline(
        title="  # Espresso   at Home ",
        intro_target_words=0,
        sections=[
            OutlineSection(
                heading=f"Section {n}" if n else "   ",
                target_words=words,
                key_points=[],
                source_ids=[],
                subsections=[OutlineSubsection(heading=" ", key_points=[])],
            )
            for n in range(sections)
        ],
        faq_questions=faq,
    )


@pytest.mark.parametrize("length", list(Length))
@pytest.mark.parametrize(("sections", "words"), [(3, 0), (20, 5000), (6, -4)])
def test_budgets_always_fit_the_band(length: Length, sections: int, words: int) -> None:
    request = BlogRequest(topic="Espresso at home", keywords=["espresso"], length=length)
    fixed, warnings = normalise_outline(_outline(sections, words, ["Q1?"]), request, ["R1?"])
    low, high = request.word_band
    assert low <= planned_words(fixed, request) <= high
    assert all(section.target_words > 0 for section in fixed.sections)
    assert fixed.title == "Espresso at Home"
    assert all(section.heading.strip() for section in fixed.sections)
    assert all(not section.subsections for section in fixed.sections)
    assert 1 <= len(fixed.sections) <= 12
    assert warnings == []


def test_faq_follows_the_request() -> None:
    wants = BlogRequest(topic="Espresso", keywords=["espresso"])
    fixed, _ = normalise_outline(_outline(4, 100, []), wants, ["From research?"])
    assert fixed.faq_questions == ["From research?"]
    none = BlogRequest(topic="Espresso", keywords=["espresso"], include_faq_section=False)
    fixed, _ = normalise_outline(_outline(4, 100, ["Q?"]), none, ["R?"])
    assert fixed.faq_questions == []
    _, warnings = normalise_outline(_outline(4, 100, []), wants, [])
    assert warnings == ["No FAQ questions were found; the FAQ section is left out"]


def test_an_outline_without_sections_is_retryable() -> None:
    request = BlogRequest(topic="Espresso", keywords=["espresso"])
    with pytest.raises(RetryableError):
        normalise_outline(_outline(1, 100, []), request, [])


def test_scale_budgets_sums_exactly() -> None:
    assert sum(scale_budgets([1, 2, 3], 600)) == 600
    assert sum(scale_budgets([0] * 12, 100)) == 100
    assert all(part > 0 for part in scale_budgets([1] * 12, 100))
    assert scale_budgets([], 10) == []
