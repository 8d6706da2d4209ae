"""Celery tasks: they take ids, claim rows, and hand numerics to the engine."""

from __future__ import annotations

import logging

from app.audio_probe import AudioError
from app.models import JobStatus
from app.queue import DELIVER_WEBHOOK, RUN_JOB, send_delivery
from app.settings import get_settings
from worker import deliveries, jobs
from worker.audio import load_job_audio
from worker.celery_app import celery
from worker.engine import EngineInputError, EngineJob
from worker.runtime import get_engine

log = logging.getLogger(__name__)


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
        out = get_engine().submit(EngineJob(audio=audio, options=claimed.options)).result()
    except (AudioError, EngineInputError) as exc:
        delivery_id = jobs.finish(
            claimed,
            status=JobStatus.failed,
            settings=settings,
            error_code=exc.code,
            error_message=exc.message,
        )
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
    if delivery_id is not None:
        send_delivery(delivery_id)


@celery.task(name=DELIVER_WEBHOOK)  # type: ignore[untyped-decorator]
def deliver_webhook(delivery_id: str) -> None:
    settings = get_settings()
    scheduled = deliveries.attempt(delivery_id, settings=settings)
    if scheduled.delay_s is not None and scheduled.delay_s <= settings.webhook_countdown_max_s:
        send_delivery(delivery_id, countdown=scheduled.delay_s)
