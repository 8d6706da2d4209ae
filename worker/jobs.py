"""A job's life in the database, as the worker sees it: claim, then finish in one transaction.

Jobs may run more than once (a redelivered message, a re-run after a lost lease). The claim
and the guarded finish make that harmless: one stored result, one bill, one webhook event.
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import and_, or_, update

from app.db import session_scope, utcnow
from app.models import DeliveryStatus, Job, JobStatus, WebhookDelivery
from app.options import TranscribeOptions
from app.serialize import webhook_payload
from app.settings import Settings


@dataclass(frozen=True)
class ClaimedJob:
    id: str
    attempt: int
    options: TranscribeOptions
    audio_blob: str | None
    audio_url: str | None


def claim(job_id: str, *, settings: Settings) -> ClaimedJob | None:
    now = utcnow()
    with session_scope() as session:
        row = session.execute(
            update(Job)
            .where(Job.id == job_id)
            .where(
                or_(
                    Job.status == JobStatus.queued,
                    and_(Job.status == JobStatus.running, Job.lease_expires_at < now),
                )
            )
            .values(
                status=JobStatus.running,
                started_at=now,
                attempts=Job.attempts + 1,
                lease_expires_at=now + timedelta(seconds=settings.job_lease_s),
                worker=socket.gethostname(),
            )
            .returning(Job.attempts, Job.options, Job.audio_blob, Job.audio_url)
        ).one_or_none()
    if row is None:
        return None
    return ClaimedJob(
        id=job_id,
        attempt=row.attempts,
        options=TranscribeOptions.from_json(row.options),
        audio_blob=row.audio_blob,
        audio_url=row.audio_url,
    )


def renew_lease(claimed: ClaimedJob, *, settings: Settings) -> bool:
    """Keep the job ours while it runs; False when another run has taken it over."""
    with session_scope() as session:
        renewed = session.execute(
            update(Job)
            .where(Job.id == claimed.id, Job.status == JobStatus.running)
            .where(Job.attempts == claimed.attempt)
            .values(lease_expires_at=utcnow() + timedelta(seconds=settings.job_lease_s))
        )
        return bool(renewed.rowcount)  # type: ignore[attr-defined]


def finish(
    claimed: ClaimedJob,
    *,
    status: JobStatus,
    settings: Settings,
    result: dict[str, Any] | None = None,
    input_length_ms: int | None = None,
    runtime_ms: int = 0,
    tokens_generated: int = 0,
    tokens_input: int = 0,
    error_code: str | None = None,
    error_message: str | None = None,
) -> str | None:
    """Store the outcome unless another run took the job over; returns a delivery id to send."""
    with session_scope() as session:
        job = session.get(Job, claimed.id, with_for_update=True)
        if job is None or job.status != JobStatus.running or job.attempts != claimed.attempt:
            return None  # canceled, or a newer run owns it now
        job.status = status
        job.finished_at = utcnow()
        job.lease_expires_at = None
        job.result = result
        if input_length_ms is not None:
            job.input_length_ms = input_length_ms
        job.runtime_ms = runtime_ms
        job.cost = round(runtime_ms / 1000 * settings.price_per_second, 10)
        job.tokens_generated = tokens_generated
        job.tokens_input = tokens_input
        job.error_code = error_code
        job.error_message = error_message
        if job.webhook_url is None:
            return None
        # The event is written with the result, so it cannot be lost between the two.
        delivery = WebhookDelivery(
            job_id=job.id,
            url=job.webhook_url,
            body=json.dumps(webhook_payload(job)),
            status=DeliveryStatus.pending,
            next_attempt_at=job.finished_at,
            dispatched_at=job.finished_at,
        )
        session.add(delivery)
        session.flush()
        return delivery.id
