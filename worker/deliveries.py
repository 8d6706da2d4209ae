"""Webhook deliveries: claim one, make one signed attempt, record it, schedule the next.

Whatever else should see each attempt (the worker's metrics and logs) registers with
``on_attempt``."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

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


@dataclass(frozen=True)
class _Claim:
    """What one attempt needs, read while claiming its delivery."""

    url: str
    body: str
    attempts: int  # attempts made before this one, as counted on the delivery
    attempt_no: int  # this attempt's number among the recorded attempts
    secrets: tuple[str, ...]


def attempt(delivery_id: str, *, settings: Settings) -> Scheduled:
    claim = _claim(delivery_id, settings)
    if claim is None:
        return Scheduled(delivery_id, None)
    body, headers = _signed(delivery_id, claim)
    started = utcnow()
    result = _deliver(delivery_id, claim.url, body, headers, started=started, settings=settings)
    # Before the record: whoever sees the attempt in the database finds it counted too.
    _attempted(delivery_id, result)
    made = claim.attempts + 1
    status, delay = _next_status(result, made, settings)
    _record(
        delivery_id,
        attempt_no=claim.attempt_no,
        started=started,
        result=result,
        status=status,
        made=made,
        delay=delay,
    )
    log.info(
        "webhook %s attempt %d: %s (%s) next in %s s",
        delivery_id,
        claim.attempt_no,
        result.outcome,
        result.status_code or result.error,
        delay,
    )
    return Scheduled(delivery_id, delay)


def _claim(delivery_id: str, settings: Settings) -> _Claim | None:
    """Lease the delivery if it is due (or its sender's lease expired); None if not."""
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
            return None
        secrets = _signing_secrets(session, job_id=claimed.job_id, batch_id=claimed.batch_id)
        attempt_no = 1 + (
            session.scalar(
                select(func.count())
                .select_from(WebhookAttempt)
                .where(WebhookAttempt.delivery_id == delivery_id)
            )
            or 0
        )
    return _Claim(
        url=claimed.url,
        body=claimed.body,
        attempts=claimed.attempts,
        attempt_no=attempt_no,
        secrets=secrets,
    )


def _signing_secrets(
    session: Session, *, job_id: str | None, batch_id: str | None
) -> tuple[str, ...]:
    # A job's event is signed with its job's key, a batch's event (no job) with its batch's.
    owner = (
        select(Job.api_key_id).where(Job.id == job_id)
        if job_id is not None
        else select(Batch.api_key_id).where(Batch.id == batch_id)
    )
    key = session.execute(
        select(ApiKey.webhook_secret, ApiKey.webhook_secret_previous).where(
            ApiKey.id == owner.scalar_subquery()
        )
    ).one()
    return tuple(s for s in (key.webhook_secret, key.webhook_secret_previous) if s)


def _signed(delivery_id: str, claim: _Claim) -> tuple[bytes, dict[str, str]]:
    body = claim.body.encode()
    headers = signature_headers(
        list(claim.secrets), msg_id=delivery_id, timestamp=int(time.time()), body=body
    )
    return body, headers


def _deliver(
    delivery_id: str,
    url: str,
    body: bytes,
    headers: dict[str, str],
    *,
    started: datetime,
    settings: Settings,
) -> AttemptResult:
    try:
        return deliver_once(
            url,
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
        return AttemptResult(
            outcome="retry",
            status_code=None,
            latency_ms=round((utcnow() - started).total_seconds() * 1000),
            error=f"delivery error: {type(exc).__name__}",
            retry_after_s=None,
        )


def _next_status(
    result: AttemptResult, made: int, settings: Settings
) -> tuple[DeliveryStatus, float | None]:
    """The delivery's new status and the delay before its next attempt (None: no more)."""
    if result.outcome == "delivered":
        return DeliveryStatus.delivered, None
    if result.outcome == "gone":
        return DeliveryStatus.gone, None
    if result.outcome == "refused":
        return DeliveryStatus.refused, None
    delay = retry_delay(
        made, schedule=settings.webhook_retry_schedule_s, retry_after_s=result.retry_after_s
    )
    return (DeliveryStatus.pending if delay is not None else DeliveryStatus.failed), delay


def _record(
    delivery_id: str,
    *,
    attempt_no: int,
    started: datetime,
    result: AttemptResult,
    status: DeliveryStatus,
    made: int,
    delay: float | None,
) -> None:
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
