"""Helpers for the interface tests (issue 15): jobs submitted as the API submits them."""

from __future__ import annotations

from app.jobs.keys import CreatedKey
from app.jobs.options import parse_options
from app.jobs.submission import AudioInput, submit_job
from app.settings import get_settings
from tests.support.api import noise_wav


def queued_job(key: CreatedKey, *, seconds: float = 1.0, seed: int = 0, **fields: str) -> str:
    """A job stored, probed and enqueued by the real submission path (no HTTP wait)."""
    settings = get_settings()
    job = submit_job(
        api_key_id=key.row.id,
        options=parse_options(fields),
        audio=AudioInput(data=noise_wav(seconds, seed=seed)),
        webhook_url=None,
        queue=settings.queue_interactive,
        settings=settings,
    )
    return job.id
