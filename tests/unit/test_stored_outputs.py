"""A claim keeps earlier stages' outputs as JSON and parses one when a stage reads it."""

from __future__ import annotations

import sys

import orjson

from core.db.pipeline import StoredOutputs

RESEARCH = {"sources": [{"id": "s1", "url": "https://example.com/a"}], "summary": "Plants."}
DRAFT = {"markdown": "# Plants\n\nSome prose — with a dash.\n", "word_count": 5}


def test_each_read_parses_the_stored_json_afresh() -> None:
    outputs = StoredOutputs.parsed({"research": RESEARCH})
    first = outputs["research"]
    first["sources"].append({"id": "s2"})
    first["summary"] = "changed"
    assert outputs["research"] == RESEARCH
    assert outputs.get("outline") is None
    assert list(outputs) == ["research"] and len(outputs) == 1


def test_adding_an_output_leaves_the_earlier_mapping_as_it_was() -> None:
    earlier = StoredOutputs.parsed({"research": RESEARCH})
    later = earlier.with_output("draft", orjson.dumps(DRAFT))
    assert dict(earlier) == {"research": RESEARCH}
    assert later == {"research": RESEARCH, "draft": DRAFT}
    assert {**later} == {"research": RESEARCH, "draft": DRAFT}


def test_the_stored_form_is_smaller_than_the_parsed_one() -> None:
    sources = [
        {"id": f"s{n}", "url": f"https://example.com/{n}", "title": f"Source {n}", "n": n}
        for n in range(50)
    ]
    outputs = StoredOutputs.parsed({"research": {"sources": sources}})
    stored = sum(sys.getsizeof(raw) for raw in outputs._raw.values())
    parsed = sys.getsizeof(sources) + sum(
        sys.getsizeof(source) + sum(sys.getsizeof(v) for v in source.values()) for source in sources
    )
    assert stored < parsed / 2
