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
from app.api.ops import install_ops
from app.api.outages import install_outage_handlers
from app.errors import OPENAI_PATH_PREFIX, install_error_handlers
from app.logging import configure_logging
from app.ratelimit import install_rate_limit_handler
from app.settings import settings_or_exit


@asynccontextmanager
async def lifespan(api: FastAPI) -> AsyncIterator[None]:
    listener = completion_listener(api)
    try:
        yield
    finally:
        await listener.close()
        api.state.completions = None


def get_openapi_doc(api: FastAPI) -> dict[str, Any]:
    return get_openapi(
        title=api.title, version=api.version, description=api.description, routes=api.routes
    )


def _drop_unsent_422(doc: dict[str, Any]) -> dict[str, Any]:
    """FastAPI documents a 422 of its own validation shape on every route with parameters;
    the OpenAI-compatible routes answer every invalid request with OpenAI's 400 instead."""
    for path, ops in doc["paths"].items():
        if path.startswith(OPENAI_PATH_PREFIX):
            for op in ops.values():
                op["responses"].pop("422", None)
    text = json.dumps(doc["paths"])
    schemas_ = doc.get("components", {}).get("schemas", {})
    if "#/components/schemas/HTTPValidationError" not in text:
        schemas_.pop("HTTPValidationError", None)
        schemas_.pop("ValidationError", None)
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
    )
    install_error_handlers(api)
    install_outage_handlers(api)
    install_rate_limit_handler(api)  # 429 with Retry-After (issue 14)
    install_ops(api)  # /healthz, /readyz, /metrics, /docs, access log (issue 16)
    api.include_router(inference.router)
    api.include_router(jobs.router)
    api.include_router(openai_compat.router)
    api.include_router(usage.router)
    api.include_router(pages.router)
    api.include_router(batches.router)

    def openapi() -> dict[str, Any]:
        if api.openapi_schema is None:
            api.openapi_schema = _drop_unsent_422(get_openapi_doc(api))
        return api.openapi_schema

    api.openapi = openapi  # type: ignore[method-assign]

    return api


app = create_app()
