"""The seed-compatible blog request (``EnhancedBlogGenerationRequest``) and its enums."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

KNOWN_TEMPLATES = frozenset(
    {
        "expert_authority",
        "how_to_guide",
        "comparison",
        "listicle",
        "case_study",
        "news",
        "product_review",
        "ultimate_guide",
    }
)
CALLBACK_EVENTS = ("job.completed", "job.failed", "job.cancelled", "job.progress")
DEFAULT_CALLBACK_EVENTS = ("job.completed", "job.failed", "job.cancelled")


class Tone(StrEnum):
    professional = "professional"
    casual = "casual"
    friendly = "friendly"
    authoritative = "authoritative"
    conversational = "conversational"
    technical = "technical"
    creative = "creative"


class Length(StrEnum):
    short = "short"
    medium = "medium"
    long = "long"
    extended = "extended"


# Word bands per length (CONTRACT.md); "extended" is open-ended, capped for checks.
LENGTH_BANDS: dict[Length, tuple[int, int]] = {
    Length.short: (300, 600),
    Length.medium: (600, 1200),
    Length.long: (1200, 2500),
    Length.extended: (2500, 4000),
}


class ResearchDepth(StrEnum):
    basic = "basic"
    standard = "standard"
    comprehensive = "comprehensive"


class BlogRequest(BaseModel):
    """What a client asks for. Field names, defaults and limits follow the seed's API."""

    model_config = ConfigDict(extra="ignore", use_enum_values=False)

    topic: str = Field(min_length=3, max_length=200)
    keywords: list[str] = Field(min_length=1, max_length=20)
    tone: Tone = Tone.professional
    length: Length = Length.medium
    use_google_search: bool = True
    use_fact_checking: bool = True
    use_citations: bool = True
    use_serp_optimization: bool = True
    use_consensus_generation: bool = False
    use_knowledge_graph: bool = True
    use_semantic_keywords: bool = True
    use_quality_scoring: bool = True
    target_audience: str | None = Field(default=None, max_length=500)
    custom_instructions: str | None = Field(default=None, max_length=2000)
    template_type: str | None = Field(default=None, max_length=100)
    include_product_research: bool = False
    include_brands: bool = True
    include_models: bool = True
    include_prices: bool = False
    include_features: bool = True
    include_reviews: bool = True
    include_pros_cons: bool = True
    include_product_table: bool = False
    include_comparison_section: bool = True
    include_buying_guide: bool = True
    include_faq_section: bool = True
    research_depth: ResearchDepth | None = ResearchDepth.standard

    # Additions of ours; old clients never send them.
    callback_url: str | None = Field(default=None, max_length=2048)
    callback_events: list[str] | None = Field(default=None, max_length=len(CALLBACK_EVENTS))
    metadata: dict[str, Any] | None = None

    @field_validator("topic")
    @classmethod
    def _topic_not_blank(cls, value: str) -> str:
        if len(value.strip()) < 3:
            raise ValueError("topic must have at least 3 non-blank characters")
        return value

    @field_validator("keywords")
    @classmethod
    def _keywords_bounded(cls, value: list[str]) -> list[str]:
        cleaned = [keyword.strip() for keyword in value]
        for keyword in cleaned:
            if not keyword:
                raise ValueError("keywords must not contain blank strings")
            if len(keyword) > 100:
                raise ValueError("each keyword must be at most 100 characters")
        return cleaned

    @field_validator("callback_url")
    @classmethod
    def _callback_is_http(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("callback_url must be an http(s) URL")
        return value

    @field_validator("callback_events")
    @classmethod
    def _known_events(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        unknown = [event for event in value if event not in CALLBACK_EVENTS]
        if unknown:
            raise ValueError(f"unknown callback_events {unknown}; allowed: {list(CALLBACK_EVENTS)}")
        return list(dict.fromkeys(value))

    @property
    def template(self) -> str:
        """The template to write with; unknown names fall back to expert_authority."""
        return self.template_type if self.template_type in KNOWN_TEMPLATES else "expert_authority"

    @property
    def word_band(self) -> tuple[int, int]:
        """Target word count range for the requested length."""
        return LENGTH_BANDS[self.length]

    @property
    def events(self) -> tuple[str, ...]:
        """The webhook events this request wants."""
        return tuple(self.callback_events) if self.callback_events else DEFAULT_CALLBACK_EVENTS
