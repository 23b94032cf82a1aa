"""Every finished result carries a quality score, its dimensions, and a warning per failed check."""

from __future__ import annotations

import asyncio

import pytest

from core.llm.offline import OFFLINE_WARNING, OfflineLLM
from core.requests import BlogRequest, Length
from core.settings import Settings
from stages.article import compose_article
from stages.inline import run_inline
from stages.markdown_doc import MarkdownDoc
from stages.models import SeoCopy
from stages.quality import check_keywords, check_readability
from stages.research import NO_SEARCH_WARNING

DIMENSIONS = {
    "length",
    "structure",
    "keyword_coverage",
    "citations",
    "readability",
    "duplicates",
    "boilerplate",
    "seo",
}
REQUEST = BlogRequest(
    topic="Home composting for beginners",
    keywords=["home composting", "compost bin", "kitchen scraps"],
)


@pytest.mark.parametrize("length", list(Length))
async def test_offline_result_passes_every_structural_check(length: Length) -> None:
    request = REQUEST.model_copy(update={"length": length})
    result = await asyncio.wait_for(run_inline(request, OfflineLLM(), Settings()), 30)

    assert set(result["quality_dimensions"]) == DIMENSIONS
    assert 0 <= result["quality_score"] <= 100
    for dimension in (
        "length",
        "structure",
        "keyword_coverage",
        "citations",
        "duplicates",
        "boilerplate",
    ):
        assert result["quality_dimensions"][dimension] == 100.0, dimension
    assert result["quality_dimensions"]["readability"] >= 30
    assert result["warnings"] == [OFFLINE_WARNING, NO_SEARCH_WARNING]
    data = result["structured_data"]
    assert data["author"]["name"] and data["publisher"]["name"]


def test_json_ld_author_and_publisher_come_from_settings() -> None:
    settings = Settings.from_env(
        {"BLOGPIPE_AUTHOR_NAME": "Ada Writer", "BLOGPIPE_PUBLISHER_NAME": "Compost Weekly"}
    )
    assert (settings.author_name, settings.publisher_name) == ("Ada Writer", "Compost Weekly")
    article, _ = compose_article(
        REQUEST,
        content=GOOD,
        title="Home Composting",
        copy=SeoCopy(meta_title="Home composting", meta_description="x", semantic_keywords=[]),
        research={},
        citations=[],
        author=settings.author_name,
        publisher=settings.publisher_name,
    )
    assert article["structured_data"]["author"] == {"@type": "Person", "name": "Ada Writer"}
    assert article["structured_data"]["publisher"]["name"] == "Compost Weekly"


GOOD = (
    "# Home Composting\n\nHome composting turns kitchen scraps into soil in a compost bin.\n\n"
    "## Start\n\nPick a spot.\n\n## Keep Going\n\nTurn the pile.\n"
)
REPEATED = (
    "Compost needs air and water and patience, and the pile should be turned every week or so."
)
BAD = (
    "# Home Composting\n\n# Second Title\n\n"
    "As an AI, I cannot garden. Notwithstanding multitudinous considerations, decomposition "
    "necessitates comprehensive understanding of microbiological transformation processes [4].\n\n"
    f"## Only Section\n\n{REPEATED}\n\n{REPEATED}\n"
)


def test_each_failed_check_lowers_its_dimension_and_warns() -> None:
    article, warnings = compose_article(
        REQUEST,
        content=BAD,
        title="Home Composting",
        copy=SeoCopy(meta_title="Home composting", meta_description="x", semantic_keywords=[]),
        research={},
        citations=[{"text": "t", "url": "https://a.example", "title": "A", "number": 1}],
    )
    scores = article["quality_dimensions"]
    assert set(scores) == DIMENSIONS
    for dimension in (
        "length",
        "structure",
        "keyword_coverage",
        "citations",
        "duplicates",
        "boilerplate",
    ):
        assert scores[dimension] < 100, dimension
    assert article["quality_score"] == round(sum(scores.values()) / len(scores), 1)
    assert all(w.startswith("Quality check: ") for w in warnings)
    text = "\n".join(warnings)
    for expected in (
        "citation [4] has no reference",
        "duplicate paragraph",
        "boilerplate phrase",
        "below the requested",
        "H1 headings",
        "keyword 'compost bin'",
    ):
        assert expected in text, expected


def test_keyword_and_readability_checks() -> None:
    assert check_keywords(GOOD, REQUEST.keywords) == []
    assert check_keywords("# T\n\nNothing here.\n", ["compost bin"]) == [
        "keyword 'compost bin' does not appear in the article"
    ]
    assert check_readability(65.0) == [] and check_readability(None) == []
    assert "below 30" in check_readability(12.0)[0]


async def test_unsupported_consensus_generation_is_reported() -> None:
    request = REQUEST.model_copy(update={"use_consensus_generation": True})
    result = await asyncio.wait_for(run_inline(request, OfflineLLM(), Settings()), 30)
    assert any("use_consensus_generation is not supported" in w for w in result["warnings"])


def test_request_options_become_explicit_requirements() -> None:
    from stages.prompts import content_requirements

    plain = content_requirements(REQUEST)
    assert any("Fact checking is on" in rule for rule in plain)
    assert not any("product article" in rule for rule in plain)
    product = content_requirements(
        REQUEST.model_copy(
            update={
                "include_product_research": True,
                "include_product_table": True,
                "use_fact_checking": False,
            }
        )
    )
    assert any("pros and cons" in rule for rule in product)
    assert any("Markdown table" in rule for rule in product)
    assert not any("Fact checking" in rule for rule in product)


def test_the_boilerplate_prefilter_never_hides_a_match() -> None:
    import random

    from stages.quality import _BOILERPLATE, check_boilerplate

    pieces = [
        "As an AI",
        "as a language model",
        "AS AN AI LANGUAGE MODEL",
        "I'm sorry",
        "i am Unable",
        "I cannot help",
        "i cannot",
        "my knowledge cutoff",
        "Lorem Ipsum",
        "TODO:",
        "todo",
        "Here is the article",
        "here is your blog post",
        "[INSERT name]",
        "as an aid",
        "gifts",
        "teen",
        ",",
        ".",
        "\n\n",
        "—",
        "ſ",
        "K",
        "İ",
        "ı",
        "AS AN A\u0130",
        "as an a\u0131",
        "lorem ip\u017fum",
        "my \u212anowledge cutoff",
        "as a language model’s",
        "“quoted”",
    ]
    rng = random.Random(7)
    for _ in range(3000):
        text = " ".join(rng.choice(pieces) for _ in range(rng.randint(0, 8)))
        expected = dict.fromkeys(m.group(0).lower() for m in _BOILERPLATE.finditer(text))
        assert check_boilerplate(text) == [f"boilerplate phrase: {p!r}" for p in expected], text


def test_duplicates_are_found_as_by_normalising_every_paragraph() -> None:
    import random
    from collections import Counter

    from stages.quality import check_duplicates, normalise_paragraph

    def reference(markdown: str) -> list[str]:
        from stages.markdown_doc import MarkdownDoc

        texts = (normalise_paragraph(p) for p in MarkdownDoc.of(markdown).paragraphs)
        counts = Counter(text for text in texts if len(text) >= 40)
        return [f"duplicate paragraph ({n}x): {t[:60]}…" for t, n in counts.items() if n > 1]

    words = ["Gifts", "gifts", "teen's", "teen’s", "snake_case", "v2.0", "[1]", "[2, 3]", "—"]
    words += ["Don't", "don’t", "well-known", "Ünïcode", "(ideas)", "a", "b", "K", "ſ", "1"]
    words += ["“quoted”…", "\u00a0", "__", "İ", "x\u0301", "[[1]2]", "«ok»"]
    rng = random.Random(11)
    for _ in range(400):
        pool = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 14))) for _ in range(4)]
        markdown = "\n\n".join(rng.choice(pool) for _ in range(rng.randint(1, 8)))
        assert check_duplicates(markdown) == reference(markdown), markdown


def test_word_total_counts_as_the_word_regex() -> None:
    """``word_total`` (byte classes for ASCII text, tokens otherwise) against
    ``len(words(text))`` on random text of letters, digits, joiners, blanks, punctuation
    and non-ASCII letters and joiners."""
    import random

    from stages.markdown_doc import word_total, words

    rng = random.Random(5)
    alphabet = "ab Z9_'-’. ,\n\t(é—"
    for _ in range(50_000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 14)))
        assert word_total(text) == len(words(text)), text
        ascii_text = text.encode("ascii", "ignore").decode()
        assert word_total(ascii_text) == len(words(ascii_text)), ascii_text


def test_normalise_paragraph_is_the_word_runs_in_lower_case() -> None:
    """``normalise_paragraph`` (bytes for ASCII text, tokens otherwise) against its
    definition: the ``\\w+`` runs of the lower-cased text without citation marks."""
    import random

    from stages.markdown_doc import CITATION
    from stages.quality import _WORD_RUN, normalise_paragraph

    def by_definition(paragraph: str) -> str:
        return " ".join(_WORD_RUN.findall(CITATION.sub("", paragraph).lower()))

    rng = random.Random(9)
    alphabet = "aB9 _'-.,[1]\n\t(é’"
    for _ in range(50_000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 14)))
        assert normalise_paragraph(text) == by_definition(text), text
        ascii_text = text.encode("ascii", "ignore").decode()
        assert normalise_paragraph(ascii_text) == by_definition(ascii_text), ascii_text


def test_plain_text_skips_only_lines_with_nothing_to_strip() -> None:
    """``plain_text`` (lines that start with a letter and hold no ``|`` passed through;
    no per-line code flags when there is no fence) against the line-by-line definition,
    on random Markdown of headings, list items, quotes, tables, fences and prose."""
    import random

    from stages import markdown_doc as md

    def by_definition(markdown: str) -> str:
        out: list[str] = []
        for line, in_code in md._content_lines(markdown):
            if in_code or ("---" in line and md._TABLE_SEPARATOR.match(line)):
                continue
            heading = md._HEADING.match(line)
            if heading:
                out.append(heading.group(2).rstrip(".:?!") + ".")
                continue
            item = md._LIST_ITEM.match(line)
            if item:
                line = line[item.end() :]
            line = line.lstrip("> ")
            if "|" in line:
                line = line.replace("|", " ")
            out.append(line)
        text = md.inline_text("\n".join(out))
        text = md.CITATION.sub("", md._URL.sub("", text))
        text = md._BLANKS.sub(" ", text)
        for mark in ".,;:!?":
            text = text.replace(" " + mark, mark)
        return text.strip()

    starts = [
        "",
        " ",
        "  ",
        "\t",
        "# ",
        "## ",
        "###",
        "#",
        "- ",
        "* ",
        "+ ",
        "-",
        "1. ",
        "12) ",
        "3.",
        "٣. ",
        "> ",
        ">> ",
        "| ",
        "|",
        "---",
        " --- ",
        ":---:",
        "```",
        "~~~",
        "é",
        "Ü ",
        "ª",
        "_",
        "**",
        "a",
        "Word ",
    ]
    bodies = [
        "tea",
        "a | b",
        "x---y",
        "--- | ---",
        "[1]",
        " [2, 3]",
        "http://x.y/z",
        "www.a.b",
        "  two  spaces",
        "\ttab",
        " .",
        "*em*",
        "`code`",
        "[t](u)",
        "?",
        "",
    ]
    rng = random.Random(3)
    for _ in range(20_000):
        lines = [
            rng.choice(starts) + "".join(rng.choice(bodies) for _ in range(rng.randint(0, 3)))
            for _ in range(rng.randint(0, 6))
        ]
        markdown = "\n".join(lines)
        expected = by_definition(markdown)
        assert md.plain_text(markdown) == expected, markdown
        assert md.MarkdownDoc(markdown).plain_text == expected, markdown


def test_tidy_blanks_drops_each_blank_before_a_mark_as_replacing_them_in_turn() -> None:
    """``_tidy_blanks`` (one regex pass for the blanks before marks) against replacing
    each blank and mark pair in turn, on random text of words, blanks and marks."""
    import random

    from stages.citations import _BLANK_RUN, _tidy_blanks

    def by_definition(text: str) -> str:
        text = _BLANK_RUN.sub(" ", text)
        for mark in ".,;:!?":
            for blank in " \t":
                text = text.replace(blank + mark, mark)
        return text

    rng = random.Random(4)
    alphabet = ["a", "word", " ", " ", "\t", "  ", ".", ",", ";", ":", "!", "?", "\n", "[1]"]
    for _ in range(20_000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        assert _tidy_blanks(text) == by_definition(text), repr(text)


def test_the_reference_heading_is_found_as_the_multiline_search_finds_it() -> None:
    """``_reference_heading`` (tried only at lines that start with ``#``) against
    ``_REFERENCE_HEADINGS.search`` on random Markdown of headings and prose."""
    import random

    from stages.citations import _REFERENCE_HEADINGS, _reference_heading

    pieces = [
        "## References",
        "### sources ",
        "# References",
        "####  Sources",
        "##",
        "#",
        "\n",
        "\n",
        "\n\n",
        " ",
        "Works Cited",
        "bibliography",
        "text",
        "##\t",
        "REFERENCES\n",
        "x # y",
        "\r\n",
    ]
    rng = random.Random(6)
    for _ in range(20_000):
        markdown = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 8)))
        expected = _REFERENCE_HEADINGS.search(markdown)
        found = _reference_heading(markdown)
        assert (found and found.span()) == (expected and expected.span()), repr(markdown)


def test_a_heading_is_read_as_the_heading_regex_reads_it() -> None:
    """``_heading`` (string methods for the usual heading, else the regex) against
    ``_HEADING.match`` on random lines and blocks of marks, blanks and text."""
    import random

    from stages.markdown_doc import _HEADING, _heading

    pieces = ["#", "#", "##", "###", " ", " ", "\t", "\n", "\r", "\u00a0", "a", "Tips", "C#", "."]
    typical = [
        "## Best presents for teenagers, take 5: what to know first",
        "# Gifts For Teens: A Practical Guide",
        "###### Six",
        "####### Seven",
        "## Closed ##",
        "## C#",
        "## #",
        "##   ",
        "#\nfoo",
        "#hashtag",
        "## trailing \n",
        "## two\nlines",
    ]
    rng = random.Random(12)
    lines = typical + [
        "".join(rng.choice(pieces) for _ in range(rng.randint(0, 10))) for _ in range(30_000)
    ]
    for line in lines:
        match = _HEADING.match(line)
        expected = (len(match.group(1)), match.group(2)) if match else None
        assert _heading(line) == expected, repr(line)


def test_a_document_that_forgot_its_lines_derives_the_same_values_again() -> None:
    markdown = (
        "# Title\n\nIntro with a [link](/a) [1].\n\n## Part\n\n| a | b |\n|---|---|\n"
        "| 1 | 2 |\n\n- one\n- two\n\n```\n# not a heading\n```\n\nLast words here.\n"
    )
    fresh = MarkdownDoc(markdown)
    kept = MarkdownDoc(markdown)
    headings, paragraphs = kept.headings, kept.paragraphs
    kept.forget_lines()
    assert "lines" not in vars(kept)
    assert kept.headings is headings and kept.paragraphs is paragraphs
    assert (kept.lines, kept.links, kept.has_table, kept.has_list) == (
        fresh.lines,
        fresh.links,
        fresh.has_table,
        fresh.has_list,
    )
    assert (kept.plain_text, kept.word_count) == (fresh.plain_text, fresh.word_count)
