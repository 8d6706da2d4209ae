"""What a transaction leaves to do once it has committed: run the hooks of what it ended
(app/jobs/lifecycle.py) and send the webhook events it wrote.

Events are an outbox: ``add_event`` (``add_job_events`` for many jobs at once) writes the
delivery row in the transaction that ended the job or batch, so the end and its event commit
together or not at all; its id goes to the broker only after the commit (a worker must never
receive an id it cannot read yet). A broker hiccup then only delays it: the reaper re-sends
any due delivery nobody took.

The work is kept in ``session.info`` and run by a listener on every ``Session``'s commit,
so no path that ends a job can forget it; a rollback drops it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import event, insert
from sqlalchemy.orm import Session, SessionTransaction

from app.infra.db import utcnow
from app.infra.models import DeliveryStatus, WebhookDelivery, new_message_id
from app.infra.queue import send_delivery

log = logging.getLogger(__name__)

_HOOKS = "whisperq_after_commit_hooks"
_SENDS = "whisperq_after_commit_sends"
# Rows of one multi-row INSERT: 10 columns each, well under Postgres' 65,535 parameters.
EVENTS_PER_INSERT = 1000


def after_commit(session: Session, hook: Callable[[], None]) -> None:
    """Run ``hook`` once this session's transaction has committed (never if it rolls back).
    A hook that raises is logged, never raised: what it follows is committed already."""
    session.info.setdefault(_HOOKS, []).append(hook)


def add_event(
    session: Session,
    *,
    url: str,
    payload: dict[str, Any],
    at: datetime,
    job_id: str | None = None,
    batch_id: str | None = None,
) -> str:
    """Write a webhook event: a job's (``job_id``) or a batch's (``batch_id``). Returns the
    delivery id, sent to the broker once the transaction commits. Every event's row comes
    from ``_delivery``, here or in ``add_job_events``."""
    delivery = WebhookDelivery(**_delivery(url, payload, at, job_id=job_id, batch_id=batch_id))
    session.add(delivery)
    session.info.setdefault(_SENDS, []).append(delivery.id)
    return delivery.id


@dataclass(frozen=True)
class JobEvent:
    job_id: str
    url: str
    payload: dict[str, Any]


def add_job_events(session: Session, events: Sequence[JobEvent], *, at: datetime) -> list[str]:
    """``add_event`` for many jobs' events in one multi-row INSERT, run now (not at the next
    flush); returns their delivery ids in order, sent once the transaction commits."""
    rows = [_delivery(e.url, e.payload, at, job_id=e.job_id, batch_id=None) for e in events]
    for start in range(0, len(rows), EVENTS_PER_INSERT):
        session.execute(insert(WebhookDelivery).values(rows[start : start + EVENTS_PER_INSERT]))
    ids = [str(row["id"]) for row in rows]
    session.info.setdefault(_SENDS, []).extend(ids)
    return ids


def _delivery(
    url: str, payload: dict[str, Any], at: datetime, *, job_id: str | None, batch_id: str | None
) -> dict[str, Any]:
    return {
        "id": new_message_id(),
        "job_id": job_id,
        "batch_id": batch_id,
        "url": url,
        "body": json.dumps(payload),
        "status": DeliveryStatus.pending,
        "attempts": 0,
        "next_attempt_at": at,
        "dispatched_at": at,
        "created_at": utcnow(),
    }


@event.listens_for(Session, "after_commit")
def _run_after_commit(session: Session) -> None:
    hooks: list[Callable[[], None]] = session.info.pop(_HOOKS, [])
    sends: list[str] = session.info.pop(_SENDS, [])
    for hook in hooks:
        try:
            hook()
        except Exception:
            log.exception("an after-commit hook failed")
    # Sent last: by the time a receiver or the API's waiter hears of an ended job, its hooks
    # (audio deleted, metrics counted) have run.
    for delivery_id in sends:
        try:
            send_delivery(delivery_id)
        except Exception:
            log.warning("webhook event %s not sent now; the reaper will", delivery_id)


@event.listens_for(Session, "after_soft_rollback")
def _drop_after_rollback(session: Session, previous_transaction: SessionTransaction) -> None:
    # A savepoint's rollback keeps them: which were its own is not known, and each is
    # harmless for a job that did not end (the hooks re-read the rows, a delivery that is
    # not there is skipped).
    if previous_transaction.parent is None:
        session.info.pop(_HOOKS, None)
        session.info.pop(_SENDS, None)
