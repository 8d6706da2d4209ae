"""The HTTP API. It stores and enqueues; it never imports torch or whisper."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from app.api import inference, jobs
from app.api.deps import completion_listener
from app.api.outages import install_outage_handlers
from app.errors import install_error_handlers
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


def create_app() -> FastAPI:
    settings_or_exit()  # refuse to start on weak secrets, not answer 500 on every request
    api = FastAPI(title="whisperq", version="0.1.0", lifespan=lifespan)
    install_error_handlers(api)
    install_outage_handlers(api)
    install_rate_limit_handler(api)  # 429 with Retry-After (issue 14)
    api.include_router(inference.router)
    api.include_router(jobs.router)

    @api.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"ok": True}

    return api


app = create_app()
