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


@asynccontextmanager
async def lifespan(api: FastAPI) -> AsyncIterator[None]:
    listener = completion_listener(api)
    try:
        yield
    finally:
        await listener.close()
        api.state.completions = None


def create_app() -> FastAPI:
    api = FastAPI(title="whisperq", version="0.1.0", lifespan=lifespan)
    install_error_handlers(api)
    install_outage_handlers(api)
    api.include_router(inference.router)
    api.include_router(jobs.router)

    @api.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"ok": True}

    return api


app = create_app()
