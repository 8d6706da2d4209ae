"""Bounds on the work one job may cost (issue 14), as pure functions the worker enforces."""

from __future__ import annotations

from typing import Any

from app.errors import ServiceError
from app.settings import Settings


class LimitError(ServiceError):
    """An ServiceError for a limit, answered with extra headers (Retry-After; Connection: close
    so a server stops reading an oversized body instead of draining it). app.api.errors answers
    it like any ServiceError: in OpenAI's shape on the OpenAI routes."""

    def __init__(
        self, status: int, code: str, message: str, *, headers: dict[str, str], **kw: Any
    ) -> None:
        super().__init__(status, code, message, **kw)
        self.headers = headers


def job_time_limit_s(input_length_ms: int | None, settings: Settings) -> float:
    """Wall-time a job may run: ``job_time_limit_min_s + job_time_limit_factor x audio s``.

    The floor covers model warm-up and short clips; the factor scales with the decoded audio
    (the worker knows it before the engine starts). With options bounded (at most six decode
    passes per 30 s window) an honest job stays far inside this; a job past it is failed with
    a reason instead of renewing its lease for ever.
    """
    audio_s = max(input_length_ms or 0, 0) / 1000
    return settings.job_time_limit_min_s + settings.job_time_limit_factor * audio_s
