"""Postgres is the truth, Redis only a wake-up signal. Every worker runs this loop:

- jobs whose lease ran out (their worker died) go back to ``queued``, or to ``failed`` once
  they have used up their attempts (a poison job);
- one worker (the leader, a Redis key with a TTL) compares the jobs waiting in Postgres with
  the wake-ups that exist in Redis, and sends only the difference, once it has lasted
  ``requeue_after_s``. A job merely waiting in a long queue is never sent twice;
- due webhook deliveries nobody took are sent again.

The count of wake-ups, in claims (a units message counts WAKE_UNITS, app/infra/queue.py):
messages waiting in the job queues plus messages workers hold (worker/broker.py). A task acks
its message once its claims commit (worker/tasks.py), so a held message is one not yet
claimed for, and a running job has no message: a dead worker's jobs are the leases' to
repair, and the expiry that queues them again sends their wake-ups at once. Workers refresh
the messages they hold on every heartbeat, so a dead worker's unclaimed messages go back to
their queue after ``visibility_timeout_s`` and count as waiting again.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import and_, or_, select, update

from app.infra.db import session_scope, utcnow
from app.infra.logging import Event
from app.infra.models import DeliveryStatus, WebhookDelivery
from app.infra.queue import SendError, send_delivery, send_jobs
from app.jobs import claims
from app.jobs.batches import end_finished_batches
from app.settings import Settings
from worker.broker import BrokerCounts, broker_counts

log = logging.getLogger(__name__)


def expire_and_dispatch(settings: Settings) -> int:
    """Expire dead workers' leases and send the wake-ups of the jobs queued again; returns
    how many jobs went back to the queue."""
    expired = claims.expire_leases(settings)
    # Their end (app/jobs/lifecycle.py) woke their waiters and sent their webhook events.
    for job_id, _delivery_id in expired.failed:
        log.warning("job %s failed: its worker died %d times", job_id, settings.job_max_attempts)
    if expired.requeued:
        log.info("reaper: %d jobs whose worker stopped are queued again", len(expired.requeued))
    by_queue: dict[str, list[str]] = {}
    for job_id, queue in expired.requeued:
        by_queue.setdefault(queue, []).append(job_id)
    for queue, job_ids in by_queue.items():
        try:
            # Their messages were acked when they were claimed: nothing else wakes a worker.
            send_jobs(job_ids, queue=queue)
        except SendError as exc:  # Redis away: the shortfall is top_up's to send
            log.warning("wake-ups of %d re-queued jobs not sent (%s)", len(job_ids), exc)
    return len(expired.requeued)


@dataclass
class Shortfall:
    """A shortfall must last ``requeue_after_s`` (and two looks) before it is acted on: a
    message between BRPOP and the unacked hash, or a job committed but not yet sent, is
    missing for a moment without being lost."""

    since: float | None = None
    floor: int = 0

    def observe(self, missing: int, now: float, window_s: float) -> int:
        if missing <= 0:
            self.since = None
            return 0
        if self.since is None:
            self.since, self.floor = now, missing
            return 0
        self.floor = min(self.floor, missing)
        if now - self.since < window_s:
            return 0
        self.since = None
        return self.floor


# kombu moves a message from its queue to the unacked hash in two steps (BRPOP, then a
# pipeline from the consumer), so for a moment it is in neither and looks lost. A shortfall is
# read again a few times, a moment apart, and the smallest reading kept: a message in that
# gap has left it by the next reading, while a lost one stays missing in all of them.
CONFIRM_READS = 3
CONFIRM_PAUSE_S = 0.02


def _read_missing(settings: Settings, client: Any) -> tuple[int, dict[str, int], BrokerCounts]:
    queues = [settings.queue_interactive, settings.queue_bulk]
    # Redis first, then Postgres: a claim or finish between the two reads can only make the
    # count look higher than it is (never invent a shortfall).
    broker = broker_counts(client, queues)
    counts = claims.queue_counts(queues)
    wakeups = sum(broker.waiting.values()) + broker.held
    return sum(counts.queued.values()) - wakeups, counts.queued, broker


def missing_messages(settings: Settings, client: Any) -> tuple[int, dict[str, int], BrokerCounts]:
    """Jobs queued in Postgres beyond the wake-ups Redis holds for them (≤ 0: none lost)."""
    reading = _read_missing(settings, client)
    for _ in range(CONFIRM_READS - 1):
        if reading[0] <= 0:
            break
        time.sleep(CONFIRM_PAUSE_S)
        reading = min(reading, _read_missing(settings, client), key=lambda r: r[0])
    return reading


def top_up(settings: Settings, client: Any, shortfall: Shortfall) -> int:
    """Send as many wake-ups as Redis lost, interactive first; returns how many."""
    missing, queued, broker = missing_messages(settings, client)
    n = shortfall.observe(missing, time.monotonic(), settings.requeue_after_s)
    if n <= 0:
        return 0
    interactive, bulk = settings.queue_interactive, settings.queue_bulk
    to_interactive = min(n, max(0, queued[interactive] - broker.waiting[interactive]))
    for queue, count in ((interactive, to_interactive), (bulk, n - to_interactive)):
        if count <= 0:
            continue
        hints = claims.oldest_queued(queue, count)
        send_jobs(hints + [""] * (count - len(hints)), queue=queue)
    log.info(
        "reaper re-sent %d jobs (their messages were missing from Redis)",
        n,
        extra={"event": Event.jobs_resent, "count": n},
    )
    return n


def is_leader(client: Any, key: str, me: str, ttl_s: int) -> bool:
    if client.set(key, me, nx=True, ex=ttl_s):
        return True
    if client.get(key) == me.encode():
        client.expire(key, ttl_s)
        return True
    return False


def resend_deliveries(settings: Settings) -> int:
    """Due webhook deliveries that no worker took (their message was lost) go out again."""
    now = utcnow()
    grace = timedelta(seconds=max(settings.reaper_interval_s, 1.0) * 2)
    not_recently_sent = or_(
        WebhookDelivery.dispatched_at.is_(None), WebhookDelivery.dispatched_at < now - grace
    )
    with session_scope() as session:
        due = session.scalars(
            select(WebhookDelivery.id)
            .where(
                or_(
                    and_(
                        WebhookDelivery.status == DeliveryStatus.pending,
                        WebhookDelivery.next_attempt_at <= now,
                        not_recently_sent,
                    ),
                    and_(
                        WebhookDelivery.status == DeliveryStatus.sending,
                        WebhookDelivery.lease_expires_at < now,
                        not_recently_sent,
                    ),
                )
            )
            .limit(500)
            .with_for_update(skip_locked=True)
        ).all()
        if due:
            session.execute(
                update(WebhookDelivery).where(WebhookDelivery.id.in_(due)).values(dispatched_at=now)
            )
    for delivery_id in due:
        send_delivery(delivery_id)
    if due:
        log.info(
            "reaper re-sent %d webhook deliveries",
            len(due),
            extra={"event": Event.deliveries_resent, "count": len(due)},
        )
    return len(due)


class Reaper:
    def __init__(self, settings: Settings, client: Any) -> None:
        self.settings = settings
        self.client = client
        self.me = uuid.uuid4().hex
        self.leader_key = f"whisperq:reaper:leader:{settings.queue_interactive}"
        self.shortfall = Shortfall()

    def sweep(self) -> int:
        """One pass; returns how many job messages were re-sent."""
        expire_and_dispatch(self.settings)
        resent = 0
        ttl = max(3, round(self.settings.reaper_interval_s * 3))
        if is_leader(self.client, self.leader_key, self.me, ttl):
            resent = top_up(self.settings, self.client, self.shortfall)
            # A safety net: a batch whose last job ended on a path without the batch hook.
            end_finished_batches()
        else:
            self.shortfall = Shortfall()
        resend_deliveries(self.settings)
        return resent


def start_reaper(settings: Settings, stop: threading.Event) -> threading.Thread:
    import redis

    client = redis.Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=5)
    reaper = Reaper(settings, client)

    def loop() -> None:
        while not stop.wait(settings.reaper_interval_s):
            try:
                reaper.sweep()
            except Exception:  # a DB or broker hiccup must not kill the loop
                log.exception("reaper sweep failed")

    thread = threading.Thread(target=loop, name="whisperq-reaper", daemon=True)
    thread.start()
    return thread


def recovery_bound_s(settings: Settings) -> float:
    """Worst case from a worker's death to the next claim of the job it was running: its
    lease runs out (``job_lease_s`` after the last renewal at most), then any live worker's
    next sweep (or a claim that finds nothing) queues the job again with its wake-up."""
    return settings.job_lease_s + settings.reaper_interval_s
