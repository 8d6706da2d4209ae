"""Per-key submission limits (issue 14): a rate in Redis, a cap on active jobs in Postgres.

* Rate: at most ``submit_rate_per_minute`` submissions per key per clock minute, counted
  with one INCR on a Redis key that expires with its window (shared by every API replica).
  Past it: 429 ``rate_limited`` with ``Retry-After`` (seconds to the next window).
* Active jobs: at most ``max_active_jobs_per_key`` queued or running jobs per key, counted
  in Postgres (the source of truth; the index on (api_key_id, created_at) narrows it).
  Past it: 429 ``too_many_active_jobs`` with ``Retry-After``.
* A Redis outage does not turn every submission into an error here: the rate check is
  skipped with a warning and the submission meets the broker's own failure path.
Both limits are checked before the body is read, so a refused caller costs no upload.
"""

from __future__ import annotations

import logging
import math
import time
from functools import lru_cache

import redis
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import func, select

from app.infra.db import session_scope
from app.infra.models import Job, JobStatus
from app.jobs.limits import LimitError
from app.settings import Settings

log = logging.getLogger(__name__)

WINDOW_S = 60
ACTIVE_RETRY_AFTER_S = 30
_PREFIX = "whisperq:submit-rate"


class RateLimitedError(LimitError):
    """A 429 that carries ``Retry-After``."""

    def __init__(self, code: str, message: str, *, retry_after_s: int) -> None:
        super().__init__(429, code, message, headers={"Retry-After": str(retry_after_s)})
        self.retry_after_s = retry_after_s


@lru_cache(maxsize=4)
def _redis(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)


def _check_rate(key_id: int, settings: Settings, now: float) -> None:
    limit = settings.submit_rate_per_minute
    if limit <= 0:
        return
    window = int(now // WINDOW_S)
    name = f"{_PREFIX}:{key_id}:{window}"
    try:
        pipe = _redis(settings.redis_url).pipeline()
        pipe.incr(name)
        pipe.expire(name, WINDOW_S * 2)
        count = int(pipe.execute()[0])
    except redis.RedisError as exc:
        log.warning("submission rate limit skipped: redis unavailable (%s)", type(exc).__name__)
        return
    if count > limit:
        retry_after = max(1, math.ceil((window + 1) * WINDOW_S - now))
        raise RateLimitedError(
            "rate_limited",
            f"more than {limit} submissions per minute for this API key; retry later",
            retry_after_s=retry_after,
        )


def _check_active(key_id: int, settings: Settings) -> None:
    cap = settings.max_active_jobs_per_key
    if cap <= 0:
        return
    with session_scope() as session:
        active = session.scalar(
            select(func.count())
            .select_from(Job)
            .where(Job.api_key_id == key_id)
            # A key's batch backlog (issue 13: tens of thousands queued) must not lock its
            # single submissions out: batches are bounded by their own settings.
            .where(Job.batch_id.is_(None))
            .where(Job.status.in_([JobStatus.queued, JobStatus.running]))
        )
    if (active or 0) >= cap:
        raise RateLimitedError(
            "too_many_active_jobs",
            f"this API key already has {cap} jobs queued or running; retry when some finish",
            retry_after_s=ACTIVE_RETRY_AFTER_S,
        )


def check_submission_limits_sync(key_id: int, settings: Settings) -> None:
    _check_rate(key_id, settings, time.time())
    _check_active(key_id, settings)


async def check_submission_limits(key_id: int, settings: Settings) -> None:
    """Raise :class:`RateLimitedError` (429) when this key may not submit now."""
    await run_in_threadpool(check_submission_limits_sync, key_id, settings)


async def check_request_rate(key_id: int, settings: Settings) -> None:
    """The per-minute rate alone, for batch requests: each counts as one submission (its
    jobs are bounded by the batch settings, and the active-jobs cap leaves batch jobs out)."""
    await run_in_threadpool(_check_rate, key_id, settings, time.time())
