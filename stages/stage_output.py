"""What every stage does with an LLM response: validate it and wrap it as a StageResult."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from core.errors import PermanentError, RetryableError
from core.llm import LLMResponse
from core.llm.offline import OFFLINE_WARNING
from stages.base import StageInput, StageResult

ModelT = TypeVar("ModelT", bound=BaseModel)


def as_model(output: BaseModel | str, model: type[ModelT]) -> ModelT:
    """The response as ``model``; invalid structured output is retryable."""
    if isinstance(output, model):
        return output
    try:
        if isinstance(output, str):
            return model.model_validate_json(output)
        return model.model_validate(output.model_dump())
    except ValidationError as exc:
        raise RetryableError(f"LLM output is not a valid {model.__name__}: {exc}") from exc


def earlier_output(stage_input: StageInput, stage: str) -> dict[str, Any]:
    """The stored output of an earlier stage; missing means the pipeline is broken."""
    output = stage_input.outputs.get(stage)
    if output is None:
        raise PermanentError(f"the output of stage {stage} is missing")
    return dict(output)


def stage_result(
    response: LLMResponse, output: dict[str, Any], warnings: Iterable[str] = ()
) -> StageResult:
    """The StageResult, with its warnings also stored in the output (the runner keeps only that)."""
    notes = list(dict.fromkeys(warnings))
    if response.provider == "offline" and OFFLINE_WARNING not in notes:
        notes.insert(0, OFFLINE_WARNING)
    output["warnings"] = notes
    return StageResult(
        output=output,
        usage=response.usage,
        provider=response.provider,
        model=response.model,
        warnings=tuple(notes),
    )


def stored_model(output: dict[str, Any], model: type[ModelT]) -> ModelT:
    """An earlier stage's stored output read back as its model (extra keys ignored)."""
    try:
        return model.model_validate(
            {key: output[key] for key in model.model_fields if key in output}
        )
    except ValidationError as exc:
        raise PermanentError(f"stored output is not a valid {model.__name__}: {exc}") from exc
