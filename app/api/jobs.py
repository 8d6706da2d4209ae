"""Job status and webhook deliveries of a job."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from sqlalchemy import select

from app.api.deps import CurrentKey, SessionDep, owned_job
from app.db import utcnow
from app.errors import ApiError
from app.models import DeliveryStatus, WebhookDelivery
from app.queue import send_delivery
from app.serialize import iso, job_status

router = APIRouter()


@router.get("/v1/jobs/{job_id}")
def get_job(job_id: str, key: CurrentKey, session: SessionDep) -> dict[str, Any]:
    return job_status(owned_job(session, job_id=job_id, key=key))


def _delivery(d: WebhookDelivery) -> dict[str, Any]:
    return {
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


@router.get("/v1/jobs/{job_id}/deliveries")
def list_deliveries(job_id: str, key: CurrentKey, session: SessionDep) -> dict[str, Any]:
    job = owned_job(session, job_id=job_id, key=key)
    rows = session.scalars(
        select(WebhookDelivery)
        .where(WebhookDelivery.job_id == job.id)
        .order_by(WebhookDelivery.created_at)
    ).all()
    return {"request_id": job.id, "deliveries": [_delivery(d) for d in rows]}


@router.post("/v1/jobs/{job_id}/deliveries/retry", status_code=202)
def retry_delivery(job_id: str, key: CurrentKey, session: SessionDep) -> dict[str, Any]:
    """Send the job's event again: the same delivery (same webhook-id, so receivers can
    deduplicate), with a fresh retry schedule."""
    job = owned_job(session, job_id=job_id, key=key)
    delivery = session.scalars(
        select(WebhookDelivery)
        .where(WebhookDelivery.job_id == job.id)
        .order_by(WebhookDelivery.created_at.desc())
    ).first()
    if delivery is None:
        raise ApiError(409, "no_delivery", "this job has no webhook delivery (yet)")
    if delivery.status == DeliveryStatus.sending:
        raise ApiError(409, "delivery_in_flight", "an attempt is in flight right now")
    now = utcnow()
    delivery.status = DeliveryStatus.pending
    delivery.attempts = 0
    delivery.next_attempt_at = now
    delivery.dispatched_at = now
    delivery.finished_at = None
    session.commit()
    send_delivery(delivery.id)
    return _delivery(delivery)
