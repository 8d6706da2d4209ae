"""Celery tasks: they take ids, claim rows, and hand numerics to the engine."""

from __future__ import annotations

import logging
from concurrent.futures import Future

from app.audio_probe import AudioError
from app.models import JobStatus
from app.notify import publish_done
from app.queue import DELIVER_WEBHOOK, RUN_JOB, send_delivery
from app.settings import Settings, get_settings
from worker import deliveries, jobs
from worker.audio import load_job_audio
from worker.celery_app import celery
from worker.engine import EngineInputError, EngineJob, EngineResult
from worker.runtime import get_engine

log = logging.getLogger(__name__)


def _wait_renewing_lease(
    future: Future[EngineResult], claimed: jobs.ClaimedJob, settings: Settings
) -> EngineResult:
    """A live worker renews its lease, so only a dead one's job is ever run again."""
    while True:
        try:
            return future.result(timeout=max(settings.job_lease_s / 3, 0.5))
        except TimeoutError:
            if not jobs.renew_lease(claimed, settings=settings):
                future.cancel()
                raise LeaseLostError(claimed.id) from None


class LeaseLostError(Exception):
    pass


@celery.task(name=RUN_JOB)  # type: ignore[untyped-decorator]
def run_job(job_id: str) -> None:
    settings = get_settings()
    claimed = jobs.claim(job_id, settings=settings)
    if claimed is None:
        log.info("job %s is not claimable (done, canceled or running elsewhere)", job_id)
        return
    delivery_id: str | None
    try:
        audio, input_length_ms = load_job_audio(
            blob=claimed.audio_blob, url=claimed.audio_url, settings=settings
        )
        future = get_engine().submit(EngineJob(audio=audio, options=claimed.options))
        out = _wait_renewing_lease(future, claimed, settings)
    except (AudioError, EngineInputError) as exc:
        delivery_id = jobs.finish(
            claimed,
            status=JobStatus.failed,
            settings=settings,
            error_code=exc.code,
            error_message=exc.message,
        )
    except LeaseLostError:
        log.warning("job %s: lease lost to another run; dropping this one", job_id)
        return
    except Exception as exc:
        log.exception("job %s failed", job_id)
        delivery_id = jobs.finish(
            claimed,
            status=JobStatus.failed,
            settings=settings,
            error_code="internal_error",
            error_message=f"{type(exc).__name__}: {exc}",
        )
    else:
        delivery_id = jobs.finish(
            claimed,
            status=JobStatus.succeeded,
            settings=settings,
            result={
                "text": out.text,
                "segments": [s.to_json() for s in out.segments],
                "language": out.language,
            },
            input_length_ms=input_length_ms,
            runtime_ms=out.runtime_ms,
            tokens_generated=out.tokens_generated,
            tokens_input=out.tokens_input,
        )
    # Wake the API's sync waiters; a spurious wake-up (the finish lost a race) only re-reads.
    publish_done(job_id, redis_url=settings.redis_url)
    if delivery_id is not None:
        send_delivery(delivery_id)


@celery.task(name=DELIVER_WEBHOOK)  # type: ignore[untyped-decorator]
def deliver_webhook(delivery_id: str) -> None:
    settings = get_settings()
    scheduled = deliveries.attempt(delivery_id, settings=settings)
    if scheduled.delay_s is not None and scheduled.delay_s <= settings.webhook_countdown_max_s:
        send_delivery(delivery_id, countdown=scheduled.delay_s)
