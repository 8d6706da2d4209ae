"""Webhook deliveries: claim one, make one signed attempt, record it, schedule the next.

Whatever else should see each attempt (the worker's metrics and logs) registers with
``on_attempt``."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import and_, func, or_, select, update

from app.infra.db import session_scope, utcnow
from app.infra.models import ApiKey, Batch, DeliveryStatus, Job, WebhookAttempt, WebhookDelivery
from app.infra.ssrf import AllowList
from app.infra.webhook_signing import signature_headers
from app.settings import Settings
from worker.webhook_http import AttemptResult, deliver_once, retry_delay

log = logging.getLogger(__name__)


AttemptHook = Callable[[str, AttemptResult], None]
_attempt_hooks: list[AttemptHook] = []


def on_attempt(hook: AttemptHook) -> None:
    """Call ``hook(delivery_id, result)`` after each attempt this process makes, before it is
    recorded (once per hook, however often it is registered). It must not raise; if it
    does, the error is logged and the attempt is recorded all the same."""
    if hook not in _attempt_hooks:
        _attempt_hooks.append(hook)


def _attempted(delivery_id: str, result: AttemptResult) -> None:
    for hook in list(_attempt_hooks):
        try:
            hook(delivery_id, result)
        except Exception:
            log.exception("a webhook-attempt hook failed")


@dataclass(frozen=True)
class Scheduled:
    delivery_id: str
    delay_s: float | None  # None: no further attempt


def lease_s(settings: Settings) -> float:
    return settings.webhook_timeout_s * 2 + 5


def attempt(delivery_id: str, *, settings: Settings) -> Scheduled:
    now = utcnow()
    with session_scope() as session:
        claimed = session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == delivery_id)
            .where(
                or_(
                    and_(
                        WebhookDelivery.status == DeliveryStatus.pending,
                        WebhookDelivery.next_attempt_at <= now,
                    ),
                    and_(
                        WebhookDelivery.status == DeliveryStatus.sending,
                        WebhookDelivery.lease_expires_at < now,
                    ),
                )
            )
            .values(
                status=DeliveryStatus.sending,
                lease_expires_at=now + timedelta(seconds=lease_s(settings)),
            )
            .returning(
                WebhookDelivery.url,
                WebhookDelivery.body,
                WebhookDelivery.attempts,
                WebhookDelivery.job_id,
                WebhookDelivery.batch_id,
            )
        ).one_or_none()
        if claimed is None:
            return Scheduled(delivery_id, None)
        # A job's event is signed with its job's key, a batch's event (no job) with its batch's.
        owner = (
            select(Job.api_key_id).where(Job.id == claimed.job_id)
            if claimed.job_id is not None
            else select(Batch.api_key_id).where(Batch.id == claimed.batch_id)
        )
        key = session.execute(
            select(ApiKey.webhook_secret, ApiKey.webhook_secret_previous).where(
                ApiKey.id == owner.scalar_subquery()
            )
        ).one()
        attempt_no = 1 + (
            session.scalar(
                select(func.count())
                .select_from(WebhookAttempt)
                .where(WebhookAttempt.delivery_id == delivery_id)
            )
            or 0
        )

    secrets = [s for s in (key.webhook_secret, key.webhook_secret_previous) if s]
    body = claimed.body.encode()
    headers = signature_headers(secrets, msg_id=delivery_id, timestamp=int(time.time()), body=body)
    started = utcnow()
    try:
        result = deliver_once(
            claimed.url,
            body,
            headers,
            timeout_s=settings.webhook_timeout_s,
            allow=AllowList.parse(settings.webhook_allowlist),
            max_redirects=settings.max_url_redirects,
        )
    except Exception as exc:
        # Whatever a receiver sends (issue 14: a malformed redirect escaped as InvalidURL and
        # left the delivery 'sending', re-POSTed for ever), the attempt is recorded and the
        # retry schedule, which ends, decides what comes next.
        log.warning("webhook %s: attempt raised %s", delivery_id, type(exc).__name__)
        result = AttemptResult(
            outcome="retry",
            status_code=None,
            latency_ms=round((utcnow() - started).total_seconds() * 1000),
            error=f"delivery error: {type(exc).__name__}",
            retry_after_s=None,
        )
    # Before the record: whoever sees the attempt in the database finds it counted too.
    _attempted(delivery_id, result)
    made = claimed.attempts + 1

    delay: float | None = None
    if result.outcome == "delivered":
        status = DeliveryStatus.delivered
    elif result.outcome == "gone":
        status = DeliveryStatus.gone
    elif result.outcome == "refused":
        status = DeliveryStatus.refused
    else:
        delay = retry_delay(
            made, schedule=settings.webhook_retry_schedule_s, retry_after_s=result.retry_after_s
        )
        status = DeliveryStatus.pending if delay is not None else DeliveryStatus.failed
    done = utcnow()
    next_at = done + timedelta(seconds=delay) if delay is not None else None
    with session_scope() as session:
        session.add(
            WebhookAttempt(
                delivery_id=delivery_id,
                attempt_no=attempt_no,
                started_at=started,
                outcome=result.outcome,
                status_code=result.status_code,
                latency_ms=result.latency_ms,
                error=result.error,
                next_attempt_at=next_at,
            )
        )
        session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == delivery_id)
            .values(
                status=status,
                attempts=made,
                next_attempt_at=next_at,
                lease_expires_at=None,
                last_status_code=result.status_code,
                last_error=result.error,
                dispatched_at=next_at,
                finished_at=None if delay is not None else done,
            )
        )
    log.info(
        "webhook %s attempt %d: %s (%s) next in %s s",
        delivery_id,
        attempt_no,
        result.outcome,
        result.status_code or result.error,
        delay,
    )
    return Scheduled(delivery_id, delay)
