"""The HTTP API. It stores and enqueues; it never imports torch or whisper."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from app.api import batches, inference, jobs, openai_compat, pages, usage
from app.api.deps import completion_listener
from app.api.errors import OPENAI_PATH_PREFIX, install_error_handlers
from app.api.ops import install_ops
from app.api.outages import install_outage_handlers
from app.infra.logging import configure_logging
from app.settings import settings_or_exit


@asynccontextmanager
async def lifespan(api: FastAPI) -> AsyncIterator[None]:
    listener = completion_listener(api)
    try:
        yield
    finally:
        await listener.close()
        api.state.completions = None


# Swagger UI groups operations by tag, in this order; an untagged one lands in "default".
OPENAPI_TAGS: list[dict[str, Any]] = [
    {"name": "inference", "description": "The hosted whisper-tiny API: submit audio."},
    {"name": "OpenAI-compatible", "description": "OpenAI's audio API, for its clients."},
    {"name": "jobs", "description": "Status, listing, cancel, delete, exports, webhooks."},
    {"name": "batches", "description": "Many files at once, with progress and results."},
    {"name": "usage", "description": "Jobs, model time and cost per day or month."},
    {"name": "operations", "description": "Health and readiness, for load balancers."},
]


def get_openapi_doc(api: FastAPI) -> dict[str, Any]:
    return get_openapi(
        title=api.title,
        version=api.version,
        description=api.description,
        routes=api.routes,
        tags=api.openapi_tags,
    )


def _tag_the_rest(doc: dict[str, Any]) -> dict[str, Any]:
    # install_ops' health routes carry no tag of their own.
    for ops in doc["paths"].values():
        for op in ops.values():
            op.setdefault("tags", ["operations"])
    return doc


def _drop_unsent_422(doc: dict[str, Any]) -> dict[str, Any]:
    """FastAPI documents a 422 of its own validation shape on every route with parameters,
    but app.api.errors answers validation errors in our error shape (OpenAI's 400 under
    /v1/audio/); and every route behind an API key can answer 401. Document what is sent."""
    ours = {"$ref": "#/components/schemas/ErrorResponse"}
    openai = {"$ref": "#/components/schemas/OpenAIErrorResponse"}
    for path, ops in doc["paths"].items():
        is_openai = path.startswith(OPENAI_PATH_PREFIX)
        for op in ops.values():
            responses = op["responses"]
            if is_openai:
                responses.pop("422", None)
            elif "HTTPValidationError" in json.dumps(responses.get("422", {})):
                responses["422"] = {
                    "description": "Unprocessable Entity",
                    "content": {"application/json": {"schema": ours}},
                }
            keyed = bool(op.get("security"))  # app.api.deps.bearer: every route behind a key
            if keyed and "401" not in responses:
                responses["401"] = {
                    "description": "Unauthorized",
                    "content": {"application/json": {"schema": openai if is_openai else ours}},
                }
    text = json.dumps(doc["paths"])
    schemas_ = doc.get("components", {}).get("schemas", {})
    if "#/components/schemas/HTTPValidationError" not in text:
        schemas_.pop("HTTPValidationError", None)
        schemas_.pop("ValidationError", None)
    return doc


def _hoist_defs(doc: dict[str, Any]) -> dict[str, Any]:
    """A schema embedded by hand (``model_json_schema()`` in ``responses=`` or
    ``openapi_extra``) carries its own ``$defs`` with ``#/$defs/...`` refs, which resolve
    against the document root and dangle there: move them into components."""
    components = doc.setdefault("components", {}).setdefault("schemas", {})

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for name, schema in node.pop("$defs", {}).items():
                components.setdefault(name, schema)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(doc["paths"])
    doc["paths"] = json.loads(
        json.dumps(doc["paths"]).replace('"#/$defs/', '"#/components/schemas/')
    )
    return doc


def create_app() -> FastAPI:
    configure_logging(settings_or_exit())  # weak secrets: refuse to start, not 500 per request
    # /docs is served by install_ops with Swagger UI's assets from this process (offline).
    api = FastAPI(
        title="whisperq",
        version="0.1.0",
        description="Self-hosted async Whisper transcription: the hosted whisper-tiny API, "
        "OpenAI's audio API, job management and transcript exports.",
        lifespan=lifespan,
        docs_url=None,
        openapi_tags=OPENAPI_TAGS,
    )
    install_error_handlers(api)
    install_outage_handlers(api)
    install_ops(api)  # /healthz, /readyz, /metrics, /docs, access log (issue 16)
    api.include_router(inference.router)
    api.include_router(jobs.router)
    api.include_router(openai_compat.router)
    api.include_router(usage.router, tags=["usage"])
    api.include_router(pages.router)
    api.include_router(batches.router)
    pages.install_browser_guards(api)  # security headers on every answer, CSRF on forms

    def openapi() -> dict[str, Any]:
        if api.openapi_schema is None:
            doc = _drop_unsent_422(_hoist_defs(get_openapi_doc(api)))
            api.openapi_schema = _tag_the_rest(doc)
        return api.openapi_schema

    api.openapi = openapi  # type: ignore[method-assign]

    return api


app = create_app()
