"""Postgres is the truth, Redis only a wake-up signal: find work the broker lost and send it
again. Duplicate sends are harmless because every task claims its row first."""

from __future__ import annotations

import logging
import threading
from datetime import timedelta

from sqlalchemy import and_, or_, select, update

from app.db import session_scope, utcnow
from app.models import DeliveryStatus, Job, JobStatus, WebhookDelivery
from app.queue import send_delivery, send_job
from app.settings import Settings

log = logging.getLogger(__name__)


def sweep(settings: Settings) -> tuple[int, int]:
    """Re-send lost jobs and deliveries; returns how many of each."""
    now = utcnow()
    stale = now - timedelta(seconds=settings.requeue_after_s)
    with session_scope() as session:
        jobs = session.execute(
            select(Job.id, Job.queue)
            .where(
                or_(
                    and_(Job.status == JobStatus.queued, Job.enqueued_at < stale),
                    and_(
                        Job.status == JobStatus.running,
                        Job.lease_expires_at < now,
                        Job.enqueued_at < stale,
                    ),
                )
            )
            .limit(500)
            .with_for_update(skip_locked=True)
        ).all()
        if jobs:
            session.execute(
                update(Job).where(Job.id.in_([j.id for j in jobs])).values(enqueued_at=now)
            )
        grace = timedelta(seconds=max(settings.reaper_interval_s, 1.0) * 2)
        deliveries = session.scalars(
            select(WebhookDelivery.id)
            .where(
                or_(
                    and_(
                        WebhookDelivery.status == DeliveryStatus.pending,
                        WebhookDelivery.next_attempt_at <= now,
                        or_(
                            WebhookDelivery.dispatched_at.is_(None),
                            WebhookDelivery.dispatched_at < now - grace,
                        ),
                    ),
                    and_(
                        WebhookDelivery.status == DeliveryStatus.sending,
                        WebhookDelivery.lease_expires_at < now,
                        or_(
                            WebhookDelivery.dispatched_at.is_(None),
                            WebhookDelivery.dispatched_at < now - grace,
                        ),
                    ),
                )
            )
            .limit(500)
            .with_for_update(skip_locked=True)
        ).all()
        if deliveries:
            session.execute(
                update(WebhookDelivery)
                .where(WebhookDelivery.id.in_(deliveries))
                .values(dispatched_at=now)
            )
    for job in jobs:
        send_job(job.id, queue=job.queue)
    for delivery_id in deliveries:
        send_delivery(delivery_id)
    if jobs or deliveries:
        log.info("reaper re-sent %d jobs and %d webhook deliveries", len(jobs), len(deliveries))
    return len(jobs), len(deliveries)


def start_reaper(settings: Settings, stop: threading.Event) -> threading.Thread:
    def loop() -> None:
        while not stop.wait(settings.reaper_interval_s):
            try:
                sweep(settings)
            except Exception:  # a DB or broker hiccup must not kill the loop
                log.exception("reaper sweep failed")

    thread = threading.Thread(target=loop, name="whisperq-reaper", daemon=True)
    thread.start()
    return thread
