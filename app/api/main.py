"""The HTTP API. It stores and enqueues; it never imports torch or whisper."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from app.api import batches, inference, jobs
from app.errors import install_error_handlers


def create_app() -> FastAPI:
    api = FastAPI(title="whisperq", version="0.1.0")
    install_error_handlers(api)
    api.include_router(inference.router)
    api.include_router(jobs.router)
    api.include_router(batches.router)

    @api.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"ok": True}

    return api


app = create_app()
