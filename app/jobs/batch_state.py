"""A batch's state, derived from its jobs (Postgres is the truth), and its end.

Its row only records what the jobs cannot say: no more inputs (``sealed_at``), canceled,
and ended (``finished_at``, set exactly once, which is what fires the batch webhook).

Exactly once: whoever may end a batch (a job's end, a cancel, a seal, a reader noticing)
first locks the batch row, then counts the unfinished jobs in a fresh statement, then sets
``finished_at`` with an UPDATE guarded by ``finished_at IS NULL``. Two workers finishing the
last two jobs at the same moment queue on the lock; the second one's count (a new snapshot
under READ COMMITTED) sees the first one's job finished.

Below app/jobs/lifecycle.py, which ends a job's batch with the job; app/jobs/batches.py
(making, adding to, sealing and canceling batches) sits above both.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, text, tuple_, update
from sqlalchemy.orm import Session

from app.infra.db import get_sessionmaker, session_scope, utcnow
from app.infra.models import TERMINAL_STATUSES, Batch, Job, JobStatus
from app.jobs.outbox import add_event
from app.jobs.serialize import iso

log = logging.getLogger(__name__)

UNFINISHED = (JobStatus.queued, JobStatus.running)
# A literal, so the planner matches it to ix_jobs_batch_unfinished (app/infra/models.py).
UNFINISHED_SQL = text("jobs.status IN ('queued', 'running')")


@dataclass(frozen=True)
class Stats:
    counts: dict[str, int]
    total: int
    audio_ms_done: int
    audio_ms_total: int
    inputs_without_duration: int
    cost: float
    runtime_ms: int
    first_started_at: datetime | None

    @property
    def finished(self) -> int:
        return sum(self.counts[s] for s in TERMINAL_STATUSES)

    @property
    def unfinished(self) -> int:
        return sum(self.counts[s] for s in UNFINISHED)


def status_of(batch: Batch) -> str:
    if batch.finished_at is not None:
        return "canceled" if batch.canceled_at is not None else "completed"
    if batch.canceled_at is not None:
        return "canceling"
    return "open" if batch.sealed_at is None else "in_progress"


def on_job_finished(session: Session, job: Job) -> str | None:
    """Call inside the transaction that made ``job`` terminal, before it commits (the one
    transition, app/jobs/lifecycle.py, does). Ends the job's batch if this was its last
    unfinished job; returns the batch event's delivery id, or None."""
    if job.batch_id is None:
        return None
    return next(iter(end_batches_if_done(session, [job.batch_id])), None)


def end_batches_if_done(session: Session, batch_ids: Iterable[str]) -> list[str]:
    """End each of these batches whose last job just ended, in the caller's transaction;
    returns the delivery ids of the batch events written (sent once it commits).

    Two statements whatever the number of batches (a bulk finish touches many): the rows
    locked in one, in one order for every transaction, so two of them never wait on each
    other's batch locks; then one index probe per open batch, in one statement."""
    wanted = sorted(set(batch_ids))
    if not wanted:
        return []
    session.flush()  # the jobs' new status must be visible to the probe below
    batches = session.scalars(
        select(Batch)
        .where(Batch.id.in_(wanted))
        .order_by(Batch.id)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).all()
    open_ = [b for b in batches if b.finished_at is None and b.sealed_at is not None]
    if not open_:
        return []
    busy = set(
        session.scalars(
            text(
                "SELECT b.id FROM unnest(CAST(:ids AS text[])) AS b(id) WHERE EXISTS "
                "(SELECT 1 FROM jobs WHERE jobs.batch_id = b.id AND "
                "jobs.status IN ('queued', 'running'))"
            ).bindparams(ids=[b.id for b in open_])
        )
        if session.get_bind().dialect.name == "postgresql"
        else []
    )
    made = []
    for batch in open_:
        if batch.id not in busy and (delivery_id := end_if_done_locked(session, batch)):
            made.append(delivery_id)
    return made


def end_if_done(batch_id: str) -> None:
    """A safety net for any path that finished a batch's last job without the hook (and
    for readers): end the batch now if it is sealed and nothing is left."""
    with session_scope() as session:
        end_batches_if_done(session, [batch_id])


def end_finished_batches(limit: int = 100) -> int:
    """For a periodic sweep (the reaper): end sealed batches whose jobs are all done."""
    with get_sessionmaker()() as session:
        ids = session.scalars(
            select(Batch.id)
            .where(Batch.finished_at.is_(None), Batch.sealed_at.is_not(None))
            .where(~select(Job.id).where(Job.batch_id == Batch.id, UNFINISHED_SQL).exists())
            .limit(limit)
        ).all()
    for batch_id in ids:
        end_if_done(batch_id)
    return len(ids)


def end_if_done_locked(session: Session, batch: Batch) -> str | None:
    """The caller holds the batch row's lock. Returns the batch event's delivery id, if
    this call ended the batch and it has a webhook."""
    if batch.finished_at is not None or batch.sealed_at is None:
        return None
    # One probe of the unfinished jobs' partial index, not a count of them: this runs at
    # every finish of a batch job, and a count made each finish cost the batch's size.
    left = session.scalar(select(Job.id).where(Job.batch_id == batch.id, UNFINISHED_SQL).limit(1))
    if left is not None:
        return None
    now = utcnow()
    ended = session.execute(
        update(Batch)
        .where(Batch.id == batch.id, Batch.finished_at.is_(None))
        .values(finished_at=now)
    ).rowcount  # type: ignore[attr-defined]
    if ended != 1:
        return None
    session.refresh(batch)
    log.info("batch %s ended (%s)", batch.id, status_of(batch))
    if batch.webhook_url is None:
        return None
    # The batch's own event, not one of its jobs': signed with the batch's key.
    return add_event(
        session,
        url=batch.webhook_url,
        payload=batch_event(batch, stats(session, batch.id)),
        at=now,
        batch_id=batch.id,
    )


def batch_event(batch: Batch, s: Stats) -> dict[str, Any]:
    return {
        "type": f"batch.{status_of(batch)}",
        "batch_id": batch.id,
        "status": status_of(batch),
        "counts": {**s.counts, "total": s.total},
        "audio_seconds_done": s.audio_ms_done / 1000,
        "cost": round(s.cost, 10),
        "created_at": iso(batch.created_at),
        "finished_at": iso(batch.finished_at),
    }


def stats(session: Session, batch_id: str) -> Stats:
    counts = {str(s): 0 for s in JobStatus}
    audio_done = audio_total = without_duration = runtime = 0
    cost = 0.0
    first: datetime | None = None
    rows = session.execute(
        select(
            Job.status,
            func.count(),
            func.coalesce(func.sum(Job.input_length_ms), 0),
            func.count(Job.input_length_ms),
            func.coalesce(func.sum(Job.cost), 0.0),
            func.coalesce(func.sum(Job.runtime_ms), 0),
            func.min(Job.started_at),
        )
        .where(Job.batch_id == batch_id)
        .group_by(Job.status)
    ).all()
    for status, n, ms, known, c, rt, started in rows:
        counts[status] = int(n)
        cost += float(c)
        runtime += int(rt)
        if status in (JobStatus.succeeded, JobStatus.failed):
            audio_done += int(ms or 0)
        if status != JobStatus.canceled:
            audio_total += int(ms or 0)
        if status in UNFINISHED:
            # Only a job still to run can learn its length (a URL, once fetched): a failed
            # upload that was not audio never will, and must not hold the ETA on job counts.
            without_duration += int(n) - int(known)
        if started is not None:
            started = _aware(started)
            first = started if first is None else min(first, started)
    return Stats(
        counts=counts,
        total=sum(counts.values()),
        audio_ms_done=audio_done,
        audio_ms_total=audio_total,
        inputs_without_duration=without_duration,
        cost=cost,
        runtime_ms=runtime,
        first_started_at=first,
    )


def _aware(value: datetime) -> datetime:
    # Aggregates skip the column type's result processing: SQLite hands back naive UTC.
    if isinstance(value, str):  # SQLite's min() of a DATETIME column is its text
        value = datetime.fromisoformat(value)
    return value if value.tzinfo is not None else value.replace(tzinfo=utcnow().tzinfo)


@dataclass(frozen=True)
class Eta:
    rate_audio_s_per_s: float | None
    rate_jobs_per_s: float | None
    eta_s: float | None


def eta(s: Stats, *, now: datetime) -> Eta:
    """Remaining work over the rate measured since this batch's first job started: audio
    seconds when every remaining input's length is known, job counts otherwise."""
    processed = s.counts[JobStatus.succeeded] + s.counts[JobStatus.failed]
    if s.first_started_at is None or processed == 0:
        return Eta(None, None, 0.0 if s.unfinished == 0 and s.total else None)
    elapsed = max((now - s.first_started_at).total_seconds(), 1e-3)
    rate_jobs = processed / elapsed
    rate_audio = s.audio_ms_done / 1000 / elapsed
    if s.unfinished == 0:
        return Eta(rate_audio, rate_jobs, 0.0)
    remaining_audio_s = (s.audio_ms_total - s.audio_ms_done) / 1000
    if s.inputs_without_duration == 0 and rate_audio > 0:
        return Eta(rate_audio, rate_jobs, remaining_audio_s / rate_audio)
    return Eta(rate_audio, rate_jobs, s.unfinished / rate_jobs)


def iter_jobs(batch_id: str, *, page_size: int, status: str | None = None) -> Iterator[list[Job]]:
    """The batch's jobs in submission order, one short session per page: nothing is held
    open while the pages travel to a slow client."""
    after: tuple[datetime, str] | None = None
    while True:
        with get_sessionmaker()() as session:
            query = select(Job).where(Job.batch_id == batch_id)
            if status is not None:
                query = query.where(Job.status == status)
            if after is not None:
                query = query.where(tuple_(Job.created_at, Job.id) > after)
            page = list(
                session.scalars(query.order_by(Job.created_at, Job.id).limit(page_size)).all()
            )
        if not page:
            return
        yield page
        if len(page) < page_size:
            return
        after = (page[-1].created_at, page[-1].id)
