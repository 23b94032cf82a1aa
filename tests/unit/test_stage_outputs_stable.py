"""The four stages give the same outputs as recorded: a guard for refactors and speed-ups.

Each case runs research, outline, draft and seo in-process with the offline LLM (some
cases script the draft or the SEO copy, to feed the SEO stage Markdown the placeholder
never writes). Every stage output, every LLM request and the result object are compared
with ``data/stage_outputs.json``. Small values are stored as they are, larger ones as
the sha256 of their canonical JSON, so a failure names the field that changed.

Regenerate the data (only when an output change is intended) with
``python -m tests.unit.test_stage_outputs_stable --write``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import random
import sys
from pathlib import Path
from typing import Any

import pytest
import textstat
from textstat.backend.selections import list_words
from textstat.backend.utils import get_cmudict

from core.constants import STAGES
from core.llm import LLMRequest, LLMResponse, TextCallback
from core.llm.offline import OfflineLLM
from core.requests import BlogRequest
from core.settings import Settings
from stages.base import StageInput
from stages.markdown_doc import plain_text
from stages.models import SeoCopy
from stages.reading_ease import (
    LANG,
    SyllableTable,
    cmu_syllables,
    flesch_reading_ease,
    lower_words,
)
from stages.registry import get_stage
from stages.result import build_result

DATA = Path(__file__).parent / "data" / "stage_outputs.json"
TIMESTAMP_KEYS = frozenset({"researched_at", "retrieved_at", "datePublished", "dateModified"})
INLINE_LIMIT = 160
"""Values whose canonical JSON is longer than this are stored as a sha256."""

_RICH_DRAFT = """Here is the article you asked for:

# Sourdough Baking at Home: A *Complete* Guide ##

Sourdough baking at home rewards patience. As an AI language model I cannot taste bread,
but the [Bread Lab](https://breadlab.example/start "Bread Lab") says hydration matters [1].
Visit www.example.org/flour or https://flour.example/guide?x=1 for **flour tables** [2, 3].

Starter care is the first habit: feed it, watch it and keep it warm [7].
Use `100%` hydration at first; it's simpler — and well-tested.

# A Second Top Heading

![A loaf on a rack](https://img.example/loaf.png) Crust colour tells you a lot.

| Flour | Protein | Notes |
| :--- | ---: | --- |
| Bread | 12-14% | Strong gluten |
| Rye | 8-10% | Sour, dense |

- Mix flour and water.
- Rest for **30 minutes** (autolyse).
1. Add the starter [2].
2) Fold every 30 minutes.

> Bakers say: "the dough tells you when it is ready."

```python
# not a heading
print("[4] is not a citation here")
```

~~~
## Not a heading either
~~~

<div>Raw HTML block</div>

Sourdough baking at home rewards patience. As an AI language model I cannot taste bread,
but the [Bread Lab](https://breadlab.example/start "Bread Lab") says hydration matters [1].

## Shaping & Proofing ###

Shape gently; see [our shaping notes](/guides/shaping) and [the index](#shaping) or
[an external page](//cdn.example/page). Lorem ipsum dolor sit amet. TODO: add photos.

#### Deep Level Skip

Café-style loaves need a hot oven – about 250 °C – and steam. Naïve bakers often
under-proof; don't. The well-known rule: bake until it's deep brown.

## Sources

- A list the writer made up [1]
- Another one

## Frequently Asked Questions

### How long does sourdough baking at home take?

About two days, most of it waiting [3].

### Is a Dutch oven needed? [2]

No, but it helps. I'm sorry to say steam matters.

### Empty question?

## Final Thoughts ##

Keep notes. Sourdough baking at home gets easier with every loaf.
"""

_FENCED_SHORT_DRAFT = """```markdown
# Quick Notes on Cold Brew Coffee

Cold brew coffee is smooth. It takes time.

## Ratio

One part coffee, eight parts water [1].

## Steeping

Twelve to eighteen hours in the fridge.
```
"""

_NO_H1_DRAFT = """Intro without any title. Kubernetes cost optimisation starts with
requests and limits [2]. Right-sizing nodes saves money, and so does autoscaling.

## Requests and Limits

Set requests from real usage. Over-provisioned pods waste nodes; under-provisioned ones
get evicted. Measure first, then tune: kubernetes cost optimisation is iterative.

## Node Pools

Spot nodes suit batch work. Keep a small on-demand pool for critical services [9].

### Spot Nodes

Spot nodes can vanish with two minutes' notice.

## FAQ

### Does autoscaling always save money?

Not always: scaling up fast without scaling down wastes money.

## References

1. Something the model wrote
2. Another
"""


def _case(name: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "request": fields}


CASES: list[dict[str, Any]] = [
    _case(
        "gifts-medium-default",
        topic="Best Presents for Christmas 2025 for Teenagers",
        keywords=["christmas gifts for teenagers", "gift ideas", "teen presents"],
        target_audience="parents",
    ),
    _case("short-single-keyword", topic="Home composting basics", keywords=["composting"]),
    _case(
        "long-casual-howto",
        topic="How to train for a first marathon",
        keywords=["marathon training", "running plan", "long runs", "tapering"],
        tone="casual",
        length="long",
        template_type="how_to_guide",
        target_audience="beginner runners over 40",
    ),
    _case(
        "extended-technical-comprehensive",
        topic="PostgreSQL indexing strategies for large tables",
        keywords=["postgresql indexing", "b-tree index", "partial index", "GIN", "BRIN index"],
        tone="technical",
        length="extended",
        research_depth="comprehensive",
        custom_instructions="Use examples with EXPLAIN ANALYZE. <b>Be concise.</b>",
    ),
    _case(
        "flags-off",
        topic="Minimalist home office setup",
        keywords=["home office setup", "desk ergonomics"],
        include_faq_section=False,
        use_citations=False,
        use_quality_scoring=False,
        use_semantic_keywords=False,
        use_google_search=False,
        use_fact_checking=False,
        use_serp_optimization=False,
        use_knowledge_graph=False,
    ),
    _case(
        "product-review",
        topic="Noise cancelling headphones compared",
        keywords=["noise cancelling headphones", "best headphones 2025", "anc", "battery life"],
        tone="authoritative",
        template_type="product_review",
        include_product_research=True,
        include_prices=True,
        include_product_table=True,
        include_brands=False,
        research_depth="basic",
    ),
    _case(
        "german-unicode",
        topic="Die besten Wanderwege in den Alpen für Familien",
        keywords=["Wanderwege Alpen", "Familienwanderung", "Hütten übernachtung"],
        tone="friendly",
        length="short",
        target_audience="Familien mit Kindern",
    ),
    _case(
        "french-accents",
        topic="Recettes de crêpes faciles à la maison",
        keywords=["crêpes faciles", "pâte à crêpes", "crêpe sucrée"],
        tone="conversational",
        template_type="listicle",
    ),
    _case(
        "keyword-not-in-topic",
        topic="Ways to sleep better tonight",
        keywords=["sleep hygiene", "insomnia tips", "bedtime routine", "melatonin", "caffeine"],
        tone="creative",
        length="long",
        use_consensus_generation=True,
    ),
    _case(
        "long-primary-keyword",
        topic="Choosing a plan",
        keywords=[
            "how to choose the right small business accounting software for freelancers",
            "bookkeeping",
        ],
        length="short",
        template_type="unknown_template",
    ),
    _case(
        "punctuated-keywords",
        topic="C++ move semantics explained",
        keywords=["c++ move semantics", "rvalue references", "std::move", "copy elision"],
        tone="technical",
        include_faq_section=True,
        research_depth=None,
    ),
    _case(
        "many-keywords",
        topic="Indoor plants that survive low light",
        keywords=[f"plant {n}" for n in range(1, 13)] + ["low light plants"],
        length="medium",
        target_audience="apartment dwellers",
        include_buying_guide=False,
        include_product_research=True,
    ),
    _case(
        "spanish-extended",
        topic="Guía completa para ahorrar energía en casa",
        keywords=["ahorrar energía", "eficiencia energética", "facturas de luz"],
        length="extended",
        tone="professional",
        template_type="ultimate_guide",
    ),
    _case(
        "scripted-rich-draft",
        topic="Sourdough baking at home",
        keywords=["sourdough baking at home", "starter", "hydration", "dutch oven"],
        draft=_RICH_DRAFT,
        seo=SeoCopy(
            meta_title="Sourdough Baking: An Extremely Long Meta Title That Will Not Fit At All",
            meta_description="Short.",
            semantic_keywords=["Starter", "levain", "  bread   flour ", "levain", "crumb"],
        ),
    ),
    _case(
        "scripted-fenced-short-draft",
        topic="Cold brew coffee at home",
        keywords=["cold brew coffee", "coffee ratio"],
        length="short",
        draft=_FENCED_SHORT_DRAFT,
    ),
    _case(
        "scripted-no-h1-draft",
        topic="Kubernetes cost optimisation",
        keywords=["kubernetes cost optimisation", "autoscaling", "spot nodes"],
        length="short",
        use_citations=True,
        draft=_NO_H1_DRAFT,
        seo=SeoCopy(
            meta_title="",
            meta_description=(
                "A description that never names the focus phrase but is long enough to "
                "pass the minimum length check for meta descriptions, and then runs on "
                "well past the maximum of one hundred and sixty characters."
            ),
            semantic_keywords=[],
        ),
    ),
]


class ScriptedLLM(OfflineLLM):
    """The offline provider, optionally answering the first draft or the SEO call with
    fixed output, and recording what every request asked."""

    def __init__(self, draft: str | None = None, seo: SeoCopy | None = None) -> None:
        super().__init__()
        self.draft = draft
        self.seo = seo
        self.requests: list[dict[str, Any]] = []

    async def generate(
        self, request: LLMRequest, on_text: TextCallback | None = None
    ) -> LLMResponse:
        draft, seo = self.draft, self.seo
        if request.stage == "draft" and draft is not None:
            self.draft = None
            request = dataclasses.replace(request, offline=lambda: draft)
        if request.stage == "seo" and seo is not None:
            request = dataclasses.replace(request, offline=lambda: seo)
        self.requests.append(
            {
                "stage": request.stage,
                "system": _digest(request.system),
                "user": _digest(request.user),
                "output_type": request.output_type.__name__ if request.output_type else None,
                "stream": request.stream,
                "max_tokens": request.max_tokens,
                "temperature": request.temperature,
            }
        )
        return await super().generate(request, on_text)


def _digest(value: Any) -> str:
    canonical = json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def _without_timestamps(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            key: "<timestamp>" if key in TIMESTAMP_KEYS else _without_timestamps(item)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [_without_timestamps(item) for item in value]
    return value


def _summary(output: dict[str, Any]) -> dict[str, Any]:
    """Each field as it is when small, else (per field for objects) the digest of its JSON."""
    summary: dict[str, Any] = {"__all__": _digest(output)}
    for key, value in output.items():
        canonical = json.dumps(value, sort_keys=True, ensure_ascii=False)
        if len(canonical) <= INLINE_LIMIT:
            summary[key] = value
        else:
            summary[key] = _summary(value) if isinstance(value, dict) else _digest(value)
    return summary


async def record(case: dict[str, Any]) -> dict[str, Any]:
    """What a case produced: every stage output and result, the requests, the progress."""
    fields = dict(case["request"])
    llm = ScriptedLLM(draft=fields.pop("draft", None), seo=fields.pop("seo", None))
    request = BlogRequest(**fields)
    progress: list[list[Any]] = []

    async def report(fraction: float, details: str) -> None:
        progress.append([round(fraction, 6), details])

    outputs: dict[str, dict[str, Any]] = {}
    stage_results: list[dict[str, Any]] = []
    for name in STAGES:
        result = await get_stage(name).run(
            StageInput(request=request, outputs=dict(outputs), settings=Settings(), report=report),
            llm,
        )
        outputs[name] = result.output
        stage_results.append(
            {
                "stage": name,
                "provider": result.provider,
                "model": result.model,
                "tokens": result.usage.total_tokens,
                "cost": result.usage.cost,
                "usage": dataclasses.asdict(result.usage),
                "warnings": list(result.warnings),
            }
        )
    article = _without_timestamps(build_result(outputs, stage_results, 0.0))
    return {
        "outputs": {name: _summary(_without_timestamps(out)) for name, out in outputs.items()},
        "result": _summary(article),
        "stage_results": stage_results,
        "requests": llm.requests,
        "progress": progress,
    }


def _stored() -> dict[str, Any]:
    return dict(json.loads(DATA.read_text(encoding="utf-8")))


def test_every_case_is_recorded() -> None:
    assert sorted(_stored()) == sorted(case["name"] for case in CASES)


@pytest.mark.parametrize("case", CASES, ids=[case["name"] for case in CASES])
async def test_stage_outputs_match_the_recording(case: dict[str, Any]) -> None:
    expected = _stored()[case["name"]]
    actual = json.loads(json.dumps(await record(case), ensure_ascii=False))
    for stage, summary in expected["outputs"].items():
        assert actual["outputs"][stage] == summary, f"stage {stage} output changed"
    assert actual["result"] == expected["result"], "result object changed"
    assert actual["requests"] == expected["requests"], "LLM requests changed"
    assert actual == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "...",
        "The cat sat on the mat. It was a sunny day. We had fun.",
        "Hyphen-ated words, teen’s and don't; naïve café über. İstanbul ſtraße K.",
        plain_text(_RICH_DRAFT),
        plain_text(_NO_H1_DRAFT),
    ],
)
def test_reading_ease_is_textstats(text: str) -> None:
    assert flesch_reading_ease(text) == textstat.flesch_reading_ease(text)


def test_reading_ease_is_textstats_on_random_text() -> None:
    """Short sentences, punctuation-only tokens, apostrophes, case: the sentence and
    word counts taken without textstat's own (``stages.reading_ease``) agree with it."""
    rng = random.Random(11)
    pieces = [
        "word",
        "Teen",
        "gift's",
        "don't",
        "'quoted'",
        "—",
        "-",
        "...",
        "!",
        "?",
        ".",
        ",",
        "3",
        "x2",
        "naïve",
        "İ",
        "é",
        "_",
        "(",
        ")",
        "'",
        "a-b",
        "It",
        "'tis",
        "we've",
        "Y'ALL",
        "o'",
        "\x1c",
        "_x",
        "#",
        "~",
    ]
    for _ in range(3000):
        tokens = [rng.choice(pieces) for _ in range(rng.randint(0, 14))]
        text = "".join(token + rng.choice([" ", " ", "", "\n", ". ", "! "]) for token in tokens)
        assert flesch_reading_ease(text) == textstat.flesch_reading_ease(text), text
        assert lower_words(text) == list_words(text, lowercase=True), text


async def _record_all() -> dict[str, Any]:
    return {case["name"]: await record(case) for case in CASES}


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python -m tests.unit.test_stage_outputs_stable --write")
    DATA.parent.mkdir(exist_ok=True)
    recorded = asyncio.run(_record_all())
    DATA.write_text(
        json.dumps(recorded, indent=1, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    print(f"wrote {len(recorded)} cases to {DATA}")


def test_the_syllable_table_is_textstats_dictionary_for_every_word() -> None:
    """``cmu_syllables`` against ``get_cmudict(LANG)[word][0]``, textstat's own lookup,
    for all 126,052 words (alternate pronunciations, comments and all)."""
    dictionary = get_cmudict(LANG)
    assert dictionary is not None
    table = cmu_syllables()
    assert table.keys() == dictionary.keys()
    differing = [
        word
        for word, pronunciations in dictionary.items()
        if table[word] != sum(1 for phone in pronunciations[0] if phone[-1].isdigit())
    ]
    assert differing == []
    assert table["tomato"] == 3 and table["read"] == 1 and "xyzzyq" not in table


def test_a_syllable_table_keeps_each_words_first_count_whatever_the_order() -> None:
    table = SyllableTable([(b"read", 2), (b"apple", 2), (b"read", 1), (b"a", 1), (b"zebra", 3)])
    assert len(table) == 4
    assert list(table) == ["a", "apple", "read", "zebra"]
    assert table["read"] == 2 and table.get("zebra") == 3 and table.get("a") == 1
    assert table.get("reads") is None and table.get("") is None and table.get("\ud800") is None
    assert "apple" in table and "appl" not in table and 3 not in table
    with pytest.raises(KeyError):
        table["b"]
