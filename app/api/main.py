"""The HTTP API. It stores and enqueues; it never imports torch or whisper."""

from __future__ import annotations

from fastapi import FastAPI

from app.api import inference, jobs, pages, usage
from app.api.ops import install_ops
from app.errors import install_error_handlers
from app.logging import configure_logging
from app.settings import get_settings


def create_app() -> FastAPI:
    configure_logging(get_settings())
    # /docs is served by install_ops with Swagger UI's assets from this process (offline).
    api = FastAPI(title="whisperq", version="0.1.0", docs_url=None)
    install_error_handlers(api)
    install_ops(api)  # /healthz, /readyz, /metrics, /docs, access log (issue 16)
    api.include_router(inference.router)
    api.include_router(jobs.router)
    api.include_router(usage.router)
    api.include_router(pages.router)
    return api


app = create_app()
