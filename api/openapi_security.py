"""What authentication and the security middleware add to the OpenAPI document: the
bearer-key scheme, and the 400/401/403/413/415/429 answers every protected route can give."""

from __future__ import annotations

from typing import Any

from api.auth import SELF_AUTHENTICATED, required_scope
from api.limits import SUBMISSION_PATHS

SCHEME = "ApiKey"
_DETAIL = {"$ref": "#/components/schemas/DetailError"}
_VALIDATION = {"$ref": "#/components/schemas/ValidationErrorResponse"}
_RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before trying again",
        "schema": {"type": "integer", "minimum": 1},
    }
}
_BODY_ERRORS = {
    "400": "Malformed or too deeply nested JSON",
    "413": "Request body too large",
    "415": "Content-Type must be application/json",
}


def _answer(description: str, **extra: Any) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": _DETAIL}},
        **extra,
    }


def secure(document: dict[str, Any]) -> dict[str, Any]:
    """``document`` with the security scheme and the middleware's responses added."""
    components = document.setdefault("components", {})
    components.setdefault("securitySchemes", {})[SCHEME] = {
        "type": "http",
        "scheme": "bearer",
        "description": "An API key (bp_live_…) from `blogpipe keys create`, bound to a tenant"
        " and scopes: jobs:write, jobs:read, operator.",
    }
    document["security"] = [{SCHEME: []}]
    for path, item in document.get("paths", {}).items():
        for method, operation in item.items():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            responses: dict[str, Any] = operation["responses"]
            if "422" in responses:
                # Validation errors list the fields; parameter errors say what is wrong.
                responses["422"] = {
                    "description": responses["422"].get("description", "Validation failed"),
                    "content": {"application/json": {"schema": {"anyOf": [_VALIDATION, _DETAIL]}}},
                }
            if method.upper() in ("POST", "PUT", "PATCH", "DELETE"):
                for code, text in _BODY_ERRORS.items():
                    if code not in responses:
                        responses[code] = _answer(text)
                    elif path in SELF_AUTHENTICATED:
                        # The middleware answers {"detail"}, the worker itself {"error"}.
                        content = responses[code].setdefault("content", {})
                        own = content.get("application/json", {}).get("schema")
                        either = {"anyOf": [own, _DETAIL]} if own else _DETAIL
                        content["application/json"] = {"schema": either}
            scope = required_scope(method.upper(), path)
            if scope is None:
                operation["security"] = []
                continue
            operation.setdefault("description", "")
            operation["description"] = (
                f"{operation['description']}\n\nNeeds an API key with scope `{scope}`."
            ).strip()
            responses.setdefault("401", _answer("Missing or invalid API key"))
            responses.setdefault("403", _answer("The API key lacks the scope this route needs"))
            if method.upper() == "POST" and SUBMISSION_PATHS.match(path):
                responses.setdefault(
                    "429", _answer("Rate limit or in-flight cap reached", headers=_RETRY_AFTER)
                )
    return document
