"""The API's sync waiters, woken when a job ends. Both the tasks (a run stored its outcome)
and the reaper (a job failed because its workers kept dying) end jobs, and the reaper runs
under the tasks (a claim that finds nothing asks it to expire dead leases): so this sits
below both rather than in either."""

from __future__ import annotations

from app.infra.notify import publish_done
from app.settings import Settings


def notify_done(job_id: str, settings: Settings) -> None:
    """Wake the API's sync waiters; a spurious wake-up (a finish that lost a race) only makes
    them re-read the row."""
    publish_done(job_id, redis_url=settings.redis_url)
