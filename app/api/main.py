"""The HTTP API. It stores and enqueues; it never imports torch or whisper."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from app.api import inference, jobs
from app.errors import install_error_handlers
from app.limits import install_limit_handler
from app.settings import settings_or_exit


def create_app() -> FastAPI:
    settings_or_exit()  # refuse to start on weak secrets, not answer 500 on every request
    api = FastAPI(title="whisperq", version="0.1.0")
    install_error_handlers(api)
    install_limit_handler(api)  # 413/429 with Connection: close / Retry-After (issue 14)
    api.include_router(inference.router)
    api.include_router(jobs.router)

    @api.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"ok": True}

    return api


app = create_app()
