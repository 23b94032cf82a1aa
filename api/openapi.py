"""The OpenAPI document, built from the pydantic models the API validates and returns."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from api import schemas
from api.openapi_security import secure
from core.constants import JOB_STATUSES
from core.requests import BlogRequest

MODELS: tuple[type[BaseModel], ...] = (
    BlogRequest,
    schemas.CreateJobResponse,
    schemas.JobStatusResponse,
    schemas.JobListResponse,
    schemas.WorkerRequest,
    schemas.WorkerResponse,
    schemas.DetailError,
    schemas.WorkerError,
    schemas.ValidationErrorResponse,
    schemas.HealthResponse,
)


def _ref(model: type[BaseModel] | str) -> dict[str, str]:
    name = model if isinstance(model, str) else model.__name__
    return {"$ref": f"#/components/schemas/{name}"}


def _json(model: type[BaseModel] | str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(model)}}}


def _components() -> dict[str, Any]:
    schemas_out: dict[str, Any] = {}
    for model in MODELS:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas_out.update(schema.pop("$defs", {}))
        schemas_out[model.__name__] = schema
    return {"schemas": schemas_out}


def _errors(*codes: int) -> dict[str, Any]:
    texts = {
        400: "Malformed request",
        404: "Not found",
        413: "Body too large",
        415: "Body must be JSON",
        503: "Temporarily unavailable",
    }
    out = {str(code): _json(schemas.DetailError, texts[code]) for code in codes}
    out["422"] = _json(
        schemas.ValidationErrorResponse, "Validation failed; the message names the field"
    )
    return out


def openapi_document(extra_paths: dict[str, Any] | None = None) -> dict[str, Any]:
    """The whole document served at /openapi.json."""
    job_id = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}
    paths: dict[str, Any] = {
        "/api/v1/blog/generate-enhanced": {
            "post": {
                "summary": "Generate a blog post (sync) or queue a job (async_mode=true)",
                "parameters": [
                    {
                        "name": "async_mode",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "boolean", "default": False},
                    }
                ],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref(BlogRequest)}},
                },
                "responses": {
                    "200": {
                        "description": "The generated article (sync mode)",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    },
                    "202": _json(schemas.CreateJobResponse, "Job queued (async mode)"),
                    **_errors(400, 413, 415, 503),
                },
            }
        },
        "/api/v1/blog/jobs": {
            "get": {
                "summary": "List jobs, newest first",
                "parameters": [
                    {
                        "name": "status",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string", "enum": list(JOB_STATUSES)},
                    },
                    {
                        "name": "limit",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "integer", "minimum": 1, "maximum": 200, "default": 50},
                    },
                    {
                        "name": "cursor",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string"},
                    },
                ],
                "responses": {"200": _json(schemas.JobListResponse, "A page of jobs"), **_errors()},
            }
        },
        "/api/v1/blog/jobs/{job_id}": {
            "get": {
                "summary": "Job status, progress and result",
                "parameters": [job_id],
                "responses": {
                    "200": _json(schemas.JobStatusResponse, "The job"),
                    "404": _json(schemas.DetailError, "Job not found"),
                },
            }
        },
        "/api/v1/blog/worker": {
            "post": {
                "summary": "Cloud Tasks worker endpoint (Google OIDC or X-Worker-Secret)",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref(schemas.WorkerRequest)}},
                },
                "responses": {
                    "200": _json(schemas.WorkerResponse, "Pipeline started (or already running)"),
                    "400": _json(schemas.WorkerError, "job_id is required"),
                    "401": _json(schemas.WorkerError, "No credentials"),
                    "403": _json(schemas.WorkerError, "Invalid credentials"),
                    "404": _json(schemas.WorkerError, "Job not found"),
                },
            }
        },
        "/healthz": {
            "get": {
                "summary": "Liveness",
                "responses": {"200": _json(schemas.HealthResponse, "Alive")},
            }
        },
        "/readyz": {
            "get": {
                "summary": "Readiness (database reachable)",
                "responses": {
                    "200": _json(schemas.HealthResponse, "Ready"),
                    "503": _json(schemas.HealthResponse, "Not ready"),
                },
            }
        },
    }
    from api.operations import openapi_paths
    from api.webhooks import openapi_paths as webhook_paths

    paths.update(openapi_paths())
    paths.update(webhook_paths())
    paths.update(extra_paths or {})
    return secure(
        {
            "openapi": "3.1.0",
            "info": {
                "title": "blogpipe",
                "version": "0.1.0",
                "description": "Durable, event-driven blog generation with an LLM.",
            },
            "paths": paths,
            "components": _components(),
        }
    )
