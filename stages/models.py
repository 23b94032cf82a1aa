"""The structured outputs the stages ask of the LLM.

Every field is required and has no default, so the JSON schemas are valid strict
OpenAI structured-output schemas (nullable fields would be ``X | None`` without a
default). The stored stage outputs are these models dumped with ``mode="json"``,
plus a ``warnings`` list added by the stage.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SearchIntent = Literal["informational", "commercial", "transactional", "navigational"]


class _Strict(BaseModel):
    """Base for LLM output models: unknown keys are rejected, not silently kept."""

    model_config = ConfigDict(extra="forbid")


class SuggestedSource(_Strict):
    """A reference the LLM proposes when no web search ran (unverified)."""

    id: str = Field(description="Short id such as S1, used by facts to cite it.")
    title: str
    url: str
    snippet: str


class Perspective(_Strict):
    """A point of view on the topic (a kind of reader or expert) and what it asks."""

    perspective: str
    questions: list[str]


class Fact(_Strict):
    """A claim the article may make, with the ids of the sources that support it."""

    claim: str
    source_ids: list[str]


class ResearchNotes(_Strict):
    """What the research stage learned about the topic from the sources it was given."""

    summary: str
    search_intent: SearchIntent
    perspectives: list[Perspective] = Field(description="3 to 6 distinct perspectives.")
    key_points: list[str]
    audience_insights: list[str]
    questions: list[str] = Field(description="Questions readers ask about the topic.")
    semantic_keywords: list[str]
    facts: list[Fact] = Field(description="Claims grounded in the sources, citing their ids.")
    entities: list[str] = Field(description="People, organisations, products, places named.")
    competitor_headings: list[str] = Field(
        description="Headings that ranking articles on this topic commonly use."
    )


class ResearchBrief(ResearchNotes):
    """Research written by the LLM alone, with the sources it suggests (no web search)."""

    sources: list[SuggestedSource]


class OutlineSubsection(_Strict):
    """An H3 under a section."""

    heading: str
    key_points: list[str]


class OutlineSection(_Strict):
    """An H2 section with its word budget."""

    heading: str
    target_words: int
    key_points: list[str]
    source_ids: list[str] = Field(description="Ids of the research sources this section uses.")
    subsections: list[OutlineSubsection]


class Outline(_Strict):
    """The article plan: H1 title, introduction budget, H2/H3 sections, FAQ questions."""

    title: str
    intro_target_words: int
    sections: list[OutlineSection]
    faq_questions: list[str]


class SeoCopy(_Strict):
    """The only SEO fields written by the LLM; everything else is computed."""

    meta_title: str = Field(description="At most 60 characters, contains the primary keyword.")
    meta_description: str = Field(
        description="120 to 160 characters, contains the primary keyword, invites the click."
    )
    semantic_keywords: list[str]
