"""Reading request bodies: size, content type, JSON, and pydantic errors naming the field."""

from __future__ import annotations

from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from api.responses import JSONResponse, detail

MAX_BODY_BYTES = 64 * 1024
Model = TypeVar("Model", bound=BaseModel)


class BadRequest(Exception):
    """Carries the response to send for an unusable request."""

    def __init__(self, response: JSONResponse, message: str | None = None) -> None:
        super().__init__(message or bytes(response.body).decode())
        self.response = response
        self.status_code = response.status_code
        self.message = message or bytes(response.body).decode()


def _reject(status_code: int, message: str) -> BadRequest:
    return BadRequest(detail(status_code, message), message)


async def read_json(request: Request, *, max_bytes: int = MAX_BODY_BYTES) -> Any:
    """The request's JSON body, or BadRequest (413, 415, 400) with a clear message."""
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise _reject(415, "Content-Type must be application/json")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise _reject(413, f"Request body is larger than {max_bytes} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > max_bytes:
            raise _reject(413, f"Request body is larger than {max_bytes} bytes")
    if not body:
        raise _reject(400, "Request body is empty; send a JSON object")
    try:
        return orjson.loads(bytes(body))
    except orjson.JSONDecodeError as exc:
        raise _reject(400, f"Request body is not valid JSON: {exc}") from None


def validate(model: type[Model], data: Any, *, prefix: tuple[str | int, ...] = ("body",)) -> Model:
    """Validate ``data`` or raise BadRequest(422) whose message names each bad field."""
    if not isinstance(data, dict):
        raise _reject(422, "Request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        response = validation_response(exc, prefix)
        raise BadRequest(response, orjson.loads(response.body)["message"]) from None


def validation_response(exc: ValidationError, prefix: tuple[str | int, ...]) -> JSONResponse:
    errors = [
        {
            "loc": [*prefix, *error["loc"]],
            "msg": error["msg"],
            "type": error["type"],
        }
        for error in exc.errors(include_url=False, include_context=False, include_input=False)
    ]
    summary = "; ".join(
        f"{'.'.join(str(part) for part in error['loc'][len(prefix) :]) or 'body'}: {error['msg']}"
        for error in errors
    )
    return JSONResponse(
        {"detail": errors, "message": f"Invalid request: {summary}"}, status_code=422
    )
