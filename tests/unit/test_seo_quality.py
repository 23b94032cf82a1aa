"""Quality checks, citation handling, the H1 fix and the result builder, on fixed input."""

from __future__ import annotations

from typing import Any

import pytest

from core.requests import BlogRequest
from stages.article import ensure_single_h1, semantic_keywords
from stages.citations import apply_citations
from stages.markdown_doc import headings
from stages.quality import (
    assess,
    check_boilerplate,
    check_citations,
    check_duplicates,
    check_length,
    check_structure,
    dimensions,
    overall,
)
from stages.result import build_result

SOURCES = [
    {"title": "A", "url": "https://a.example/1"},
    {"title": "B", "url": "https://b.example/2"},
    {"title": "C", "url": "https://c.example/3"},
]


def test_citation_integrity() -> None:
    good = "# T\n\nClaim [1]. Other [2].\n\n## References\n\n1. [A](u)\n2. [B](v)\n"
    assert check_citations(good) == []
    broken = "# T\n\nClaim [1]. Other [4].\n\n## References\n\n1. [A](u)\n2. [B](v)\n"
    assert check_citations(broken) == [
        "citation [4] has no reference",
        "reference 2 is never cited",
    ]
    assert check_citations("# T\n\nNo citations at all.\n") == []
    assert check_citations("Claim [1, 2].\n\n## References\n\n1. a\n2. b\n") == []


def test_apply_citations_renumbers_drops_and_lists_only_cited_sources() -> None:
    draft = (
        "# T\n\nFirst claim [3]. Second claim [1][3]. Bogus [9].\n\n"
        "## Sources\n\n- made up by the writer\n"
    )
    cited = apply_citations(draft, SOURCES, enabled=True)
    assert "First claim [1]. Second claim [2][1]. Bogus." in cited.markdown
    assert "made up by the writer" not in cited.markdown
    assert cited.markdown.rstrip().endswith(
        "1. [C](https://c.example/3)\n2. [A](https://a.example/1)"
    )
    assert [(c["number"], c["title"]) for c in cited.citations] == [(1, "C"), (2, "A")]
    assert cited.citations[0]["text"] == "First claim."
    assert cited.warnings == ["Removed citation markers that matched no source: 9"]
    assert check_citations(cited.markdown) == []


def test_apply_citations_disabled_strips_markers() -> None:
    cited = apply_citations("# T\n\nClaim [1].\n", SOURCES, enabled=False)
    assert cited.markdown == "# T\n\nClaim.\n" and cited.citations == [] and cited.warnings == []


def test_duplicate_paragraphs() -> None:
    paragraph = "This paragraph is long enough to count as a real paragraph of prose."
    markdown = f"# T\n\n{paragraph}\n\n## A\n\n{paragraph.upper()} [2]\n\nShort.\n\nShort.\n"
    issues = check_duplicates(markdown)
    assert len(issues) == 1 and issues[0].startswith("duplicate paragraph (2x)")
    assert check_duplicates(f"# T\n\n{paragraph}\n") == []


@pytest.mark.parametrize(
    "text",
    [
        "As an AI language model, I think coffee is good.",
        "I'm sorry, but I cannot help with that.",
        "Here is the article you asked for.",
        "Lorem ipsum dolor sit amet.",
        "Add a photo here [insert image].",
    ],
)
def test_boilerplate_is_flagged(text: str) -> None:
    assert check_boilerplate(f"# T\n\n{text}\n")


def test_clean_prose_has_no_boilerplate() -> None:
    assert check_boilerplate("# T\n\nAI tools help writers; a language model drafts text.\n") == []


def test_length_band() -> None:
    assert check_length(450, (300, 600)) == []
    assert check_length(299, (300, 600)) == ["article has 299 words, below the requested 300-600"]
    assert check_length(601, (300, 600)) == ["article has 601 words, above the requested 300-600"]


def test_structure() -> None:
    good = headings("# T\n\n## A\n\n### A1\n\n## B\n")
    assert check_structure(good) == []
    bad = headings("# T\n\n# U\n\n#### Deep\n\n## Only one H2\n")
    issues = check_structure(bad)
    assert "article has 2 H1 headings, expected 1" in issues
    assert "article has fewer than two H2 sections" in issues
    assert any("heading level skipped" in issue for issue in issues)


def test_dimensions_and_overall() -> None:
    markdown = "# T\n\n## A\n\ntext [1]\n\n## B\n\nAs an AI, text.\n"
    report = assess(markdown, headings(markdown), 10, (300, 600))
    assert report.citations and report.boilerplate and report.length
    scores = dimensions(
        report, flesch=70.0, seo=50.0, word_total=10, band=(300, 600), citations_expected=True
    )
    assert scores["citations"] < 100 and scores["boilerplate"] < 100 and scores["length"] < 10
    assert overall(scores) == round(sum(scores.values()) / len(scores), 1)
    assert overall({}) == 0.0


def test_ensure_single_h1() -> None:
    fixed, title = ensure_single_h1("Sure! Here you go.\n# Real Title\n\nText\n\n# Second\n", "x")
    assert title == "Real Title"
    assert fixed.startswith("# Real Title") and "## Second" in fixed and "Sure!" not in fixed
    added, title = ensure_single_h1("No heading here.\n", "Outline Title")
    assert title == "Outline Title" and added.startswith("# Outline Title\n\nNo heading")


def test_semantic_keywords_merge_without_requested_ones() -> None:
    request = BlogRequest(topic="Espresso", keywords=["espresso", "crema"])
    merged = semantic_keywords(
        request, ["Espresso", "latte art", "grinder"], ["Latte Art", "tamping"]
    )
    assert merged == ["latte art", "grinder", "tamping"]
    off = BlogRequest(topic="Espresso", keywords=["espresso"], use_semantic_keywords=False)
    assert semantic_keywords(off, ["x"]) == []


def test_build_result_totals_and_merged_warnings() -> None:
    outputs: dict[str, dict[str, Any]] = {
        "research": {"warnings": ["w1", "shared"]},
        "outline": {"warnings": []},
        "draft": {"warnings": ["shared"]},
        "seo": {"title": "T", "content": "# T\n", "warnings": ["w4"]},
    }
    stage_results = [
        {"stage": "research", "provider": "openai", "tokens": 10, "cost": 0.001},
        {"stage": "outline", "provider": "openai", "tokens": 5, "cost": 0.0005, "model": "m"},
    ]
    result = build_result(outputs, stage_results, 12.34567)
    assert result["warnings"] == ["w1", "shared", "w4"]
    assert result["total_tokens"] == 15 and result["total_cost"] == 0.0015
    assert result["generation_time"] == 12.346
    assert result["stage_results"][1] == {
        "stage": "outline",
        "provider": "openai",
        "tokens": 5,
        "cost": 0.0005,
        "model": "m",
    }
    assert outputs["seo"]["warnings"] == ["w4"]  # the stored output is not mutated
    with pytest.raises(ValueError, match="seo"):
        build_result({"research": {}}, [], 1.0)
