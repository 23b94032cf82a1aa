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


class Source(_Strict):
    """A reference the article may cite."""

    title: str
    url: str
    snippet: str


class ResearchBrief(_Strict):
    """What the research stage learned about the topic."""

    summary: str
    search_intent: SearchIntent
    key_points: list[str]
    audience_insights: list[str]
    questions: list[str] = Field(description="Questions readers ask about the topic.")
    semantic_keywords: list[str]
    sources: list[Source]


class OutlineSubsection(_Strict):
    """An H3 under a section."""

    heading: str
    key_points: list[str]


class OutlineSection(_Strict):
    """An H2 section with its word budget."""

    heading: str
    target_words: int
    key_points: list[str]
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
