"""Jobs: status, listing, cancel, delete, transcript exports and webhook deliveries."""

from __future__ import annotations

import base64
import binascii
from datetime import UTC, datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Query
from fastapi.responses import PlainTextResponse, Response
from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from app.api import schemas
from app.api.deps import CurrentKey, SessionDep, SettingsDep, owned_job
from app.errors import ErrorCode, ServiceError
from app.infra.db import utcnow
from app.infra.models import DeliveryStatus, Job, JobStatus, WebhookDelivery
from app.infra.notify import publish_cancel
from app.infra.queue import send_delivery
from app.jobs.lifecycle import delete_unreferenced, end_job
from app.jobs.serialize import iso, job_status, job_summary, transcript_document
from app.jobs.transcripts import DEFAULT_LINE_WIDTH, to_srt, to_txt, to_vtt
from app.settings import Settings

# Path and query parameters fail validation with our 422 shape, not FastAPI's default.
router = APIRouter(tags=["jobs"], responses=schemas.error_responses(401, 422))

NOT_FOUND = schemas.error_responses(401, 404)
ALL_STATUSES = tuple(JobStatus)


# --- listing ----------------------------------------------------------------------------


def encode_cursor(job: Job) -> str:
    raw = f"{job.created_at.isoformat()}|{job.id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        stamp, _, job_id = raw.partition("|")
        created = datetime.fromisoformat(stamp)
        if created.tzinfo is None or not job_id.isalnum():
            raise ValueError(raw)
        created = created.astimezone(UTC)
    except (ValueError, OverflowError, binascii.Error, UnicodeDecodeError):
        raise ServiceError.of(
            ErrorCode.invalid_cursor, "cursor is not one this API handed out", field="cursor"
        ) from None
    return created, job_id


def _utc(value: datetime | None, field: str) -> datetime | None:
    """Aware UTC (naive means UTC); a time that has no UTC equivalent (year 1 at +01:00) is
    the caller's 422, not an overflow deep in the driver."""
    if value is None:
        return None
    try:
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).astimezone(UTC)
    except OverflowError:
        raise ServiceError.of(ErrorCode.invalid_request, "time out of range", field=field) from None


@router.get(
    "/v1/jobs",
    response_model=schemas.JobPage,
    responses=schemas.error_responses(401, 422),
    summary="List your jobs, newest first",
)
def list_jobs(
    key: CurrentKey,
    session: SessionDep,
    settings: SettingsDep,
    status: Annotated[
        list[JobStatus] | None, Query(description="only these statuses (repeat the parameter)")
    ] = None,
    created_after: Annotated[
        datetime | None, Query(description="created at or after (ISO 8601; naive means UTC)")
    ] = None,
    created_before: Annotated[datetime | None, Query(description="created before")] = None,
    limit: Annotated[int, Query(ge=1, le=1000, description="page size (capped by server)")] = 20,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page")] = None,
) -> schemas.JobPage:
    """Keyset pagination on (created_at, id): a page starts strictly after the previous
    page's last row, so rows inserted during a walk can neither repeat nor shift a row out."""
    limit = min(limit, settings.jobs_page_size_max)
    query = select(Job).where(Job.api_key_id == key.id)
    if status:
        query = query.where(Job.status.in_([str(s) for s in status]))
    if (after := _utc(created_after, "created_after")) is not None:
        query = query.where(Job.created_at >= after)
    if (before := _utc(created_before, "created_before")) is not None:
        query = query.where(Job.created_at < before)
    if cursor is not None:
        created, job_id = decode_cursor(cursor)
        query = query.where(
            or_(Job.created_at < created, and_(Job.created_at == created, Job.id < job_id))
        )
    rows = session.scalars(
        query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)
    ).all()
    page, more = rows[:limit], len(rows) > limit
    return schemas.JobPage(
        data=[schemas.JobSummary.model_validate(job_summary(j)) for j in page],
        has_more=more,
        next_cursor=encode_cursor(page[-1]) if more else None,
    )


@router.get(
    "/v1/jobs/{job_id}", response_model=schemas.JobView, responses=NOT_FOUND, summary="A job"
)
def get_job(job_id: str, key: CurrentKey, session: SessionDep) -> schemas.JobView:
    return schemas.JobView.model_validate(job_status(owned_job(session, job_id=job_id, key=key)))


# --- cancel and delete ------------------------------------------------------------------


def _cancel_queued(session: Session, job: Job, settings: Settings) -> bool:
    """Queued → canceled, guarded: if a worker claimed the row first, this ends nothing and
    the job is running, never both. ``job`` is refreshed when it ended."""
    now = utcnow()
    ended = end_job(
        session,
        job.id,
        JobStatus.canceled,
        where=Job.status == JobStatus.queued,
        settings=settings,
        cancel_requested_at=now,
    )
    if ended is None:
        return False
    # The commit sends its webhook event, wakes a sync caller waiting on it and, unless
    # retention keeps audio, deletes its audio (app/jobs/lifecycle.py).
    session.commit()
    return True


@router.post(
    "/v1/jobs/{job_id}/cancel",
    response_model=schemas.JobView,
    responses={
        202: {"model": schemas.JobView, "description": "running: asked to stop"},
        **schemas.error_responses(401, 404, 409),
    },
    summary="Cancel a job",
)
def cancel_job(
    job_id: str, key: CurrentKey, session: SessionDep, settings: SettingsDep, response: Response
) -> schemas.JobView:
    """A queued job is canceled at once and never runs. A running one is asked to stop: the
    worker drops it at its next 30-second window, charged for what ran, and it ends
    ``canceled`` (202 until then)."""
    job = owned_job(session, job_id=job_id, key=key)
    if job.status == JobStatus.queued and not _cancel_queued(session, job, settings):
        session.refresh(job)  # a worker claimed it between our read and our UPDATE
    if job.status == JobStatus.running:
        session.execute(
            update(Job)
            .where(Job.id == job.id, Job.status == JobStatus.running)
            .where(Job.cancel_requested_at.is_(None))
            .values(cancel_requested_at=utcnow())
        )
        session.commit()
        publish_cancel([job.id], redis_url=settings.redis_url)
        session.refresh(job)
        if job.status == JobStatus.running:
            response.status_code = 202
    if job.status in (JobStatus.succeeded, JobStatus.failed):
        raise ServiceError.of(ErrorCode.job_already_finished, f"the job already ended {job.status}")
    return schemas.JobView.model_validate(job_status(job))


@router.delete(
    "/v1/jobs/{job_id}",
    response_model=schemas.JobView,
    responses=schemas.error_responses(401, 404, 409),
    summary="Delete a job's audio, transcript and webhook bodies",
)
def delete_job(
    job_id: str, key: CurrentKey, session: SessionDep, settings: SettingsDep
) -> schemas.JobView:
    """The audio blob, the transcript, the prompt and every webhook body are removed; the
    row stays with its status, times and metering, for billing. A queued job is canceled
    first; a running one must be canceled and ended first (409)."""
    job = owned_job(session, job_id=job_id, key=key)
    if job.status == JobStatus.queued:
        _cancel_queued(session, job, settings)
        session.refresh(job)
    if job.status in (JobStatus.queued, JobStatus.running):
        raise ServiceError.of(
            ErrorCode.job_in_progress,
            "the job is running: cancel it (POST /v1/jobs/{id}/cancel) and delete it once it ended",
        )
    blob = job.audio_blob
    job.audio_blob = None
    job.audio_url = None
    job.result = None
    if job.options.get("initial_prompt") is not None:
        job.options = {**job.options, "initial_prompt": None}
    if job.deleted_at is None:
        job.deleted_at = utcnow()
    session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.job_id == job.id)
        .where(WebhookDelivery.status == DeliveryStatus.pending)
        .values(status=DeliveryStatus.failed, last_error="job deleted", next_attempt_at=None)
    )
    session.execute(update(WebhookDelivery).where(WebhookDelivery.job_id == job.id).values(body=""))
    session.commit()
    if blob is not None:  # after the commit: a row never points at nothing
        delete_unreferenced([blob])
    return schemas.JobView.model_validate(job_status(job))


# --- transcript exports -----------------------------------------------------------------

EXPORT_TYPES = {"txt": "text/plain", "srt": "application/x-subrip", "vtt": "text/vtt"}


@router.get(
    "/v1/jobs/{job_id}/transcript.{fmt}",
    response_model=schemas.TranscriptDocument,
    responses={
        200: {
            "description": "json: the full transcript; txt, srt, vtt: text files",
            "content": {t: {"schema": {"type": "string"}} for t in EXPORT_TYPES.values()},
        },
        **schemas.error_responses(401, 404, 409, 410, 422),
    },
    summary="The transcript as txt, srt, vtt or json",
)
def export_transcript(
    job_id: str,
    fmt: Literal["txt", "srt", "vtt", "json"],
    key: CurrentKey,
    session: SessionDep,
    line_width: Annotated[
        int,
        Query(ge=0, le=1000, description="srt/vtt: wrap cue text at spaces (0: never)"),
    ] = DEFAULT_LINE_WIDTH,
) -> Response:
    job = owned_job(session, job_id=job_id, key=key)
    if job.deleted_at is not None:
        raise ServiceError.of(ErrorCode.job_deleted, "the job's transcript was deleted")
    if job.status in (JobStatus.queued, JobStatus.running):
        raise ServiceError.of(ErrorCode.job_not_finished, f"the job is still {job.status}")
    if job.status != JobStatus.succeeded or job.result is None:
        raise ServiceError.of(ErrorCode.job_has_no_transcript, f"the job ended {job.status}")
    doc = transcript_document(job)
    # Every format downloads as a file named after the job, json too.
    disposition = {"Content-Disposition": f'attachment; filename="{job.id}.{fmt}"'}
    if fmt == "json":
        return Response(
            schemas.TranscriptDocument.model_validate(doc).model_dump_json(),
            media_type="application/json",
            headers=disposition,
        )
    segments = doc["segments"]
    body = {
        "txt": lambda: to_txt(segments),
        "srt": lambda: to_srt(segments, line_width=line_width),
        "vtt": lambda: to_vtt(segments, line_width=line_width),
    }[fmt]()
    return PlainTextResponse(body, media_type=EXPORT_TYPES[fmt], headers=disposition)


# --- webhook deliveries -----------------------------------------------------------------


def _delivery(d: WebhookDelivery) -> schemas.Delivery:
    return schemas.Delivery.model_validate(
        {
            "id": d.id,
            "url": d.url,
            "status": d.status,
            "attempts": [
                {
                    "attempt": a.attempt_no,
                    "at": iso(a.started_at),
                    "outcome": a.outcome,
                    "status_code": a.status_code,
                    "latency_ms": a.latency_ms,
                    "error": a.error,
                    "next_attempt_at": iso(a.next_attempt_at),
                }
                for a in d.attempt_rows
            ],
            "next_attempt_at": iso(d.next_attempt_at),
            "created_at": iso(d.created_at),
        }
    )


@router.get(
    "/v1/jobs/{job_id}/deliveries",
    response_model=schemas.DeliveryList,
    responses=NOT_FOUND,
    summary="Webhook deliveries of a job, with every attempt",
)
def list_deliveries(job_id: str, key: CurrentKey, session: SessionDep) -> schemas.DeliveryList:
    job = owned_job(session, job_id=job_id, key=key)
    rows = session.scalars(
        select(WebhookDelivery)
        .where(WebhookDelivery.job_id == job.id)
        .order_by(WebhookDelivery.created_at)
    ).all()
    return schemas.DeliveryList(request_id=job.id, deliveries=[_delivery(d) for d in rows])


@router.post(
    "/v1/jobs/{job_id}/deliveries/retry",
    status_code=202,
    response_model=schemas.Delivery,
    responses=schemas.error_responses(401, 404, 409, 410),
    summary="Send the job's webhook event again",
)
def retry_delivery(job_id: str, key: CurrentKey, session: SessionDep) -> schemas.Delivery:
    """Send the job's event again: the same delivery (same webhook-id, so receivers can
    deduplicate), with a fresh retry schedule."""
    job = owned_job(session, job_id=job_id, key=key)
    if job.deleted_at is not None:
        raise ServiceError.of(ErrorCode.job_deleted, "the job was deleted; its event body is gone")
    delivery = session.scalars(
        select(WebhookDelivery)
        .where(WebhookDelivery.job_id == job.id)
        .order_by(WebhookDelivery.created_at.desc())
    ).first()
    if delivery is None:
        raise ServiceError(409, "no_delivery", "this job has no webhook delivery (yet)")
    if delivery.status == DeliveryStatus.sending:
        raise ServiceError(409, "delivery_in_flight", "an attempt is in flight right now")
    now = utcnow()
    delivery.status = DeliveryStatus.pending
    delivery.attempts = 0
    delivery.next_attempt_at = now
    delivery.dispatched_at = now
    delivery.finished_at = None
    session.commit()
    send_delivery(delivery.id)
    return _delivery(delivery)
