"""The stages by name, in pipeline order."""

from __future__ import annotations

from stages.base import Stage
from stages.draft import DraftStage
from stages.outline import OutlineStage
from stages.research import ResearchStage
from stages.seo import SeoStage

STAGE_IMPLEMENTATIONS: dict[str, Stage] = {
    "research": ResearchStage(),
    "outline": OutlineStage(),
    "draft": DraftStage(),
    "seo": SeoStage(),
}


def get_stage(name: str) -> Stage:
    """The stage called ``name``; KeyError names the known ones."""
    try:
        return STAGE_IMPLEMENTATIONS[name]
    except KeyError:
        raise KeyError(
            f"unknown stage {name!r}; known: {', '.join(STAGE_IMPLEMENTATIONS)}"
        ) from None
