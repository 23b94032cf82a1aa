"""SEO facts computed from fixed Markdown: snippets, slug, keywords, JSON-LD, headings."""

from __future__ import annotations

import re

import pytest

from stages.markdown_doc import (
    has_list,
    has_table,
    headings,
    links,
    paragraphs,
    plain_text,
    reading_time,
    slugify,
    word_count,
)
from stages.seo_analysis import (
    META_DESCRIPTION_MAX,
    META_DESCRIPTION_MIN,
    META_TITLE_MAX,
    analyse_keywords,
    count_phrase,
    fit_meta_description,
    fit_meta_title,
    keyword_density,
    make_slug,
    readability,
    seo_score,
)
from stages.structured_data import blog_posting, faq_entries, social_tags

ARTICLE = """# Home Espresso Machines: A Buyer's Guide

A good home espresso machine turns beans into café-quality coffee [1]. This guide
compares **home espresso machines** by price, speed and ease of use.

## Why Home Espresso Machines Matter

Fresh espresso tastes better than pods, and it costs less per cup [2]. See the
[grind guide](/guides/grind) and the [SCA standards](https://sca.coffee/research).

## Choosing a Machine

| Type | Price |
| --- | --- |
| Manual | Low |
| Automatic | High |

- Check the boiler size.
- Compare the warranty.

```python
# not a heading
print("https://example.com/ignored")
```

## Choosing a Machine

Pick the machine that fits your morning routine and your counter.

## Frequently Asked Questions

### Is a home espresso machine worth it?

Yes, if you drink espresso every day.

### How long do machines last?

Most last five to ten years with descaling.

## References

1. [Coffee Science](https://example.org/coffee)
2. [Cost Study](https://example.org/cost)
"""
KEYWORD = "home espresso machines"


def test_headings_have_unique_ids_and_skip_code() -> None:
    found = headings(ARTICLE)
    assert [h.level for h in found] == [1, 2, 2, 2, 2, 3, 3, 2]
    assert found[0].text == "Home Espresso Machines: A Buyer's Guide"
    ids = [h.id for h in found]
    assert len(ids) == len(set(ids))
    assert ids[2:4] == ["choosing-a-machine", "choosing-a-machine-1"]
    assert all(re.fullmatch(r"[a-z0-9]+(?:-[a-z0-9]+)*", i) for i in ids)


def test_structure_facts() -> None:
    assert [link.url for link in links(ARTICLE)][:2] == [
        "/guides/grind",
        "https://sca.coffee/research",
    ]
    assert has_table(ARTICLE) and has_list(ARTICLE)
    assert not has_table("a | b\nno separator") and not has_list("plain text")
    assert len(paragraphs(ARTICLE)) == 5
    assert reading_time(0) == 1 and reading_time(231) == 2


def test_plain_text_strips_markdown_urls_and_citations() -> None:
    text = plain_text(ARTICLE)
    assert "[1]" not in text and "https://" not in text and "**" not in text
    assert "print(" not in text and "|" not in text
    assert "grind guide" in text
    assert word_count("# Title\n\nOne two [3] three https://x.y/z four.") == 5


def test_readability_is_flesch_on_plain_text() -> None:
    easy = readability("The cat sat on the mat. It was a sunny day. We had fun.")
    hard = readability(
        "Notwithstanding considerable methodological heterogeneity, comprehensive "
        "epidemiological investigations substantiate multifactorial aetiologies."
    )
    assert easy > 80 > 20 > hard
    assert readability("") == 0.0


def test_meta_title_fits_and_keeps_the_keyword() -> None:
    assert fit_meta_title("Home Espresso Machines Compared", "t", KEYWORD) == (
        "Home Espresso Machines Compared"
    )
    long = "The Ultimate and Truly Exhaustive Guide to Choosing Home Espresso Machines in 2025"
    fitted = fit_meta_title(long, long, KEYWORD)
    assert len(fitted) <= META_TITLE_MAX and KEYWORD in fitted.lower()
    repaired = fit_meta_title("Great coffee at home", "Buyer's guide", KEYWORD)
    assert len(repaired) <= META_TITLE_MAX and repaired.lower().startswith(KEYWORD)


@pytest.mark.parametrize(
    "candidate",
    [
        "Too short.",
        "",
        "Compare home espresso machines by price, speed and ease of use, with a table of "
        "options, answers to common questions and the mistakes to avoid before you buy one.",
        "x" * 30 + " words without the phrase " * 10,
    ],
)
def test_meta_description_is_120_to_160_with_keyword(candidate: str) -> None:
    fitted = fit_meta_description(candidate, ARTICLE, KEYWORD)
    assert META_DESCRIPTION_MIN <= len(fitted) <= META_DESCRIPTION_MAX
    assert count_phrase(fitted, KEYWORD) == 1 or KEYWORD in fitted.lower()


def test_good_meta_description_is_kept() -> None:
    good = (
        "Compare home espresso machines by price, speed and ease of use, and learn which "
        "features matter before you buy one for your kitchen."
    )
    assert fit_meta_description(good, ARTICLE, KEYWORD) == good


@pytest.mark.parametrize(
    ("keyword", "title"),
    [
        (KEYWORD, "Home Espresso Machines: A Buyer's Guide"),
        ("Café Crème & Co.", "Über Coffee — the Best Café Crème"),
        ("a very long primary keyword " * 4, "Title"),
        ("", "Only A Title Here"),
    ],
)
def test_slug_rules(keyword: str, title: str) -> None:
    slug = make_slug(keyword, title)
    assert re.fullmatch(r"[a-z0-9]+(?:-[a-z0-9]+)*", slug)
    assert len(slug) <= 60
    if keyword and len(slugify(keyword)) <= 60:
        assert slugify(keyword) in slug


def test_keyword_density_and_counts() -> None:
    text = "Espresso is great. I love espresso! Tea is fine too."
    assert count_phrase(text, "espresso") == 2
    assert count_phrase("espressos and espresso-based drinks", "espresso") == 1
    assert keyword_density(text, "espresso") == pytest.approx(100 * 2 / 10)
    assert keyword_density("", "espresso") == 0.0
    assert count_phrase("Home  espresso\nmachines", KEYWORD) == 1


def test_keyword_analysis_and_score() -> None:
    found = headings(ARTICLE)
    facts = analyse_keywords(
        ARTICLE,
        [KEYWORD, "espresso"],
        title=found[0].text,
        meta_title="Home Espresso Machines Compared",
        meta_description="All about home espresso machines.",
        slug="home-espresso-machines",
        heading_list=found,
    )
    assert facts.in_title and facts.in_meta_title and facts.in_headings and facts.in_slug
    assert facts.in_first_paragraph
    assert facts.keywords["espresso"]["count"] >= facts.keywords[KEYWORD]["count"] >= 3
    data = facts.as_json()
    assert data["primary_keyword"] == KEYWORD and "keywords" in data
    score = seo_score(
        facts,
        meta_title="Home Espresso Machines Compared",
        meta_description="All about home espresso machines.",
        heading_list=found,
        word_total=word_count(ARTICLE),
        word_band=(300, 600),
        flesch=readability(ARTICLE),
        link_count=len(links(ARTICLE)),
    )
    assert 0 <= score <= 100
    # Short article and short description cost points; the rest is in place.
    assert 60 <= score < 100


def test_json_ld_blog_posting_with_faq() -> None:
    faq = faq_entries(ARTICLE)
    assert [entry.question for entry in faq] == [
        "Is a home espresso machine worth it?",
        "How long do machines last?",
    ]
    assert faq[1].answer == "Most last five to ten years with descaling."
    document = blog_posting(
        headline="Home Espresso Machines",
        description="desc",
        keywords=[KEYWORD],
        word_count=321,
        sections=["Why"],
        slug="home-espresso-machines",
        faq=faq,
    )
    for key in (
        "@context",
        "@type",
        "headline",
        "description",
        "wordCount",
        "keywords",
        "datePublished",
        "inLanguage",
    ):
        assert key in document
    assert document["@type"] == "BlogPosting" and document["wordCount"] == 321
    page = document["hasPart"]
    assert page["@type"] == "FAQPage"
    assert page["mainEntity"][0]["@type"] == "Question"
    assert page["mainEntity"][0]["acceptedAnswer"]["@type"] == "Answer"
    no_faq = blog_posting(
        headline="h", description="d", keywords=[], word_count=1, sections=[], slug="s"
    )
    assert "hasPart" not in no_faq
    assert faq_entries("# T\n\n## Intro\n\n### Not a question\n\ntext\n") == []


def test_social_tags() -> None:
    og, twitter = social_tags(title="T", description="D", slug="s", keywords=["k"])
    assert og["og:type"] == "article" and og["og:title"] == "T" and og["og:url"] == "/s"
    assert twitter == {
        "twitter:card": "summary_large_image",
        "twitter:title": "T",
        "twitter:description": "D",
    }
