"""A job's life in the database, as the worker sees it: claim, heartbeat, then finish in one
transaction.

A Redis message only says "there is work": the task claims the next job by policy
(interactive before bulk, across API keys the one with the fewest jobs running, then the one
served least recently), with ``FOR UPDATE SKIP LOCKED`` so concurrent claimers never wait on
each other. Jobs may still run more than once (a worker that died, a lease lost to a stall):
the lease, the attempt number and the guarded finish make that harmless, with one stored
result, one bill and one webhook event.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Integer, and_, func, or_, select, text, update
from sqlalchemy.orm import Session

from app.infra.db import UTCDateTime, session_scope, utcnow
from app.infra.models import Job, JobStatus
from app.jobs.batch_state import end_batches_if_done
from app.jobs.lifecycle import EndedJob, end_job, end_jobs
from app.jobs.options import TranscribeOptions
from app.settings import Settings

log = logging.getLogger(__name__)

WORKER_LOST = "worker_lost"
HOST = socket.gethostname()

# Spelled as literals, never bound: a prepared statement's generic plan cannot match
# ``status = $1`` to the partial indexes' predicates (app/infra/models.py), and would fall back
# to scanning every job.
QUEUED = text("jobs.status = 'queued'")
RUNNING = text("jobs.status = 'running'")

# The keys with queued work in one queue, one index probe per key (a loose index scan) rather
# than a scan of the whole backlog, with when each key last had a job started and how many
# it has running in any queue (the fair order and the cap): a claim costs the same with 20
# or 20,000 jobs waiting. The running count is one index range per key, not a GROUP BY over
# all running jobs, which was planned as a bitmap scan over every dead 'running' entry
# since the last vacuum. ORDER BY ... LIMIT 1, not
# min(): with statistics taken before a batch landed, min() was planned as an aggregate over
# every queued row (EXPLAIN in bench/RESULTS.md, "Backlog").
_KEYS_WITH_WORK = text(
    """
    WITH RECURSIVE k(id) AS (
        SELECT (SELECT api_key_id FROM jobs WHERE status = 'queued' AND queue = :queue
                ORDER BY api_key_id LIMIT 1)
        UNION ALL
        SELECT (SELECT api_key_id FROM jobs
                WHERE status = 'queued' AND queue = :queue AND api_key_id > k.id
                ORDER BY api_key_id LIMIT 1)
        FROM k WHERE k.id IS NOT NULL
    )
    SELECT k.id AS id,
           (SELECT s.started_at FROM jobs s
            WHERE s.api_key_id = k.id AND s.started_at IS NOT NULL
            ORDER BY s.started_at DESC LIMIT 1) AS last_started,
           (SELECT count(*) FROM jobs r
            WHERE r.status = 'running' AND r.api_key_id = k.id) AS running
    FROM k WHERE k.id IS NOT NULL
    """
).columns(id=Integer, last_started=UTCDateTime, running=Integer)


@dataclass(frozen=True)
class ClaimedJob:
    id: str
    attempt: int
    options: TranscribeOptions
    audio_blob: str | None
    audio_url: str | None
    queue: str = ""
    input_length_ms: int | None = None


@dataclass(frozen=True)
class ClaimResult:
    job: ClaimedJob | None
    # Queued work exists but every key that has some is at its in-flight cap.
    capped: bool = False


def _fair_order(keys: dict[int, datetime | None], running: dict[int, int]) -> list[int]:
    """Fewest jobs in flight first, then the key served least recently."""
    floor = datetime.min
    return sorted(
        keys,
        key=lambda k: (running.get(k, 0), (keys[k] or floor).replace(tzinfo=None), k),
    )


def claim_next(*, queues: Sequence[str], settings: Settings, worker: str = HOST) -> ClaimResult:
    """Start the next job by policy, or return none (nothing queued, or all keys capped)."""
    with session_scope() as session:
        return _claim_in(session, queues=queues, settings=settings, worker=worker)


@dataclass(frozen=True)
class ClaimBatch:
    jobs: list[ClaimedJob]
    capped: bool = False  # fewer than asked for: the rest of the queued work is capped


def claim_many(
    n: int, *, queues: Sequence[str], settings: Settings, worker: str = HOST
) -> ClaimBatch:
    """Start up to ``n`` jobs by the same policy as :func:`claim_next`, in one transaction:
    each claim sees the ones before it (the fair order, the per-key cap), and a worker
    claiming for many threads at once pays one commit, not one per job."""
    jobs: list[ClaimedJob] = []
    with session_scope() as session:
        for _ in range(n):
            got = _claim_in(session, queues=queues, settings=settings, worker=worker)
            if got.job is None:
                return ClaimBatch(jobs, capped=got.capped)
            jobs.append(got.job)
    return ClaimBatch(jobs)


def _claim_in(
    session: Session, *, queues: Sequence[str], settings: Settings, worker: str
) -> ClaimResult:
    capped = False
    for queue in queues:
        rows = session.execute(_KEYS_WITH_WORK, {"queue": queue}).all()
        keys = {row.id: row.last_started for row in rows}
        running = {row.id: int(row.running) for row in rows}
        cap = settings.key_max_in_flight
        eligible = {k: t for k, t in keys.items() if not cap or running.get(k, 0) < cap}
        capped = capped or len(eligible) < len(keys)
        for key in _fair_order(eligible, running):
            claimed = _claim_oldest(session, queue, key, settings=settings, worker=worker)
            if claimed is not None:
                return ClaimResult(claimed)
    return ClaimResult(None, capped=capped)


def _claim_oldest(
    session: Session, queue: str, key: int, *, settings: Settings, worker: str
) -> ClaimedJob | None:
    """The key's oldest queued job, started. On Postgres ``SKIP LOCKED`` steps past jobs
    being claimed right now; SQLite has no row locks, so two claimers pick the same job and
    the guarded update lets one win: the other tries the key's next job rather than giving
    up on the key (which left a message with nothing claimed and a job waiting for the
    reaper). Each lost race means a job left ``queued``, so the loop ends."""
    while True:
        job_id = session.scalar(
            select(Job.id)
            .where(QUEUED, Job.queue == queue, Job.api_key_id == key)
            .order_by(Job.created_at, Job.id)
            .limit(1)
            .with_for_update(skip_locked=True)
        )
        if job_id is None:
            return None  # all of this key's queued jobs are being claimed right now
        claimed = _start(session, job_id, settings=settings, worker=worker)
        if claimed is not None:
            return claimed


def _start(session: Session, job_id: str, *, settings: Settings, worker: str) -> ClaimedJob | None:
    """queued → running with a fresh lease and the next attempt number. Guarded even after
    ``FOR UPDATE``: SQLite has no row locks, and a cancel may have won the row."""
    now = utcnow()
    row = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.queued)
        .values(
            status=JobStatus.running,
            started_at=now,
            attempts=Job.attempts + 1,
            lease_expires_at=now + timedelta(seconds=settings.job_lease_s),
            worker=worker,
        )
        .returning(
            Job.attempts,
            Job.options,
            Job.audio_blob,
            Job.audio_url,
            Job.queue,
            Job.input_length_ms,
        )
    ).one_or_none()
    if row is None:
        return None
    return ClaimedJob(
        id=job_id,
        attempt=row.attempts,
        options=TranscribeOptions.from_json(row.options),
        audio_blob=row.audio_blob,
        audio_url=row.audio_url,
        queue=row.queue,
        input_length_ms=row.input_length_ms,
    )


def claim(job_id: str, *, settings: Settings, worker: str = HOST) -> ClaimedJob | None:
    """Start one given job if it is still queued (tools and tests; tasks use claim_next)."""
    with session_scope() as session:
        return _start(session, job_id, settings=settings, worker=worker)


@dataclass(frozen=True)
class Heartbeat:
    renewed: frozenset[str]  # still ours
    cancel_requested: frozenset[str]  # ours, and a cancel was asked for


def renew_leases(claimed: Sequence[ClaimedJob], *, settings: Settings) -> Heartbeat:
    """One statement for all of this worker's running jobs: extend the leases still ours."""
    if not claimed:
        return Heartbeat(frozenset(), frozenset())
    ours = or_(*(and_(Job.id == c.id, Job.attempts == c.attempt) for c in claimed))
    with session_scope() as session:
        rows = session.execute(
            update(Job)
            # A lease that ran out during a stall (Postgres down) is taken back as long as
            # nobody claimed the job since: the attempt number says so.
            .where(ours, Job.status.in_([JobStatus.running, JobStatus.queued]))
            .values(
                status=JobStatus.running,
                lease_expires_at=utcnow() + timedelta(seconds=settings.job_lease_s),
            )
            .returning(Job.id, Job.cancel_requested_at)
        ).all()
    return Heartbeat(
        renewed=frozenset(r.id for r in rows),
        cancel_requested=frozenset(r.id for r in rows if r.cancel_requested_at is not None),
    )


def hand_back(claimed: ClaimedJob) -> bool:
    """Give a job this worker will not finish back to the queue at once (shutdown). The
    attempt is not counted: the job did not kill anyone."""
    with session_scope() as session:
        done = session.execute(
            update(Job)
            .where(Job.id == claimed.id, Job.status == JobStatus.running)
            .where(Job.attempts == claimed.attempt)
            .values(
                status=JobStatus.queued,
                attempts=Job.attempts - 1,
                lease_expires_at=None,
                worker=None,
                enqueued_at=utcnow(),
            )
        )
        return bool(done.rowcount)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Finished:
    stored: bool
    delivery_id: str | None = None  # its webhook event, sent once stored


@dataclass(frozen=True)
class Outcome:
    """How a run ended, as its finish stores it."""

    status: JobStatus
    result: dict[str, Any] | None = None
    input_length_ms: int | None = None
    runtime_ms: int = 0
    tokens_generated: int = 0
    tokens_input: int = 0
    error_code: str | None = None
    error_message: str | None = None


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
) -> Finished:
    """Store the outcome unless another run took the job over (:func:`finish_many`)."""
    outcome = Outcome(
        status=status,
        result=result,
        input_length_ms=input_length_ms,
        runtime_ms=runtime_ms,
        tokens_generated=tokens_generated,
        tokens_input=tokens_input,
        error_code=error_code,
        error_message=error_message,
    )
    return finish_many([(claimed, outcome)], settings=settings)[0]


def finish_many(
    outcomes: Sequence[tuple[ClaimedJob, Outcome]], *, settings: Settings
) -> list[Finished]:
    """Store several runs' outcomes in one transaction, each as if alone.

    The guard is the attempt number: a run may finish its job while it is ``running`` or,
    after its lease ran out, ``queued`` again but not yet claimed by anyone else (a stall
    or a Postgres outage longer than the lease), never once a newer run claimed it."""
    done: list[Finished] = []
    batches: set[str] = set()
    with session_scope() as session:
        for claimed, o in outcomes:
            ended = end_job(
                session,
                claimed.id,
                o.status,
                where=and_(
                    Job.status.in_([JobStatus.running, JobStatus.queued]),
                    Job.attempts == claimed.attempt,
                ),
                settings=settings,
                result=o.result,
                input_length_ms=o.input_length_ms,
                runtime_ms=o.runtime_ms,
                tokens_generated=o.tokens_generated,
                tokens_input=o.tokens_input,
                error_code=o.error_code,
                error_message=o.error_message,
                # Each batch's end is looked at once for all of them, below.
                batch_hook=False,
            )
            # None: canceled, or a newer run owns it now.
            stored = ended is not None
            done.append(Finished(stored, ended.delivery_id if ended is not None else None))
            if ended is not None and ended.batch_id is not None:
                batches.add(ended.batch_id)
        end_batches_if_done(session, batches)
    return done


@dataclass(frozen=True)
class Expired:
    requeued: list[tuple[str, str]]  # (job id, queue): back to queued, to be run again
    # (job id, delivery id): ended here, out of attempts (or canceled meanwhile); the
    # delivery is sent once ended, like any job's event
    failed: list[tuple[str, str | None]]


def expire_leases(settings: Settings, *, limit: int = 500) -> Expired:
    """Jobs whose worker stopped renewing: queued again, or failed once out of attempts."""
    now = utcnow()
    requeued: list[tuple[str, str]] = []
    canceled: list[str] = []
    out_of_attempts: dict[int, list[str]] = {}
    with session_scope() as session:
        rows = session.scalars(
            select(Job)
            .where(RUNNING, Job.lease_expires_at < now)
            .limit(limit)
            .with_for_update(skip_locked=True)
        ).all()
        for job in rows:
            if job.cancel_requested_at is not None:
                # Canceled while its worker died: it ends here, never runs again.
                canceled.append(job.id)
            elif job.attempts >= settings.job_max_attempts:
                out_of_attempts.setdefault(job.attempts, []).append(job.id)
            else:
                job.status = JobStatus.queued
                job.lease_expires_at = None
                job.worker = None
                job.enqueued_at = now
                requeued.append((job.id, job.queue))
        # Rows this transaction holds locked since it read them running: no guard but theirs.
        # Their batches are ended once, below, all in one lock order.
        ended: list[EndedJob] = []
        if canceled:
            ended += end_jobs(
                session,
                JobStatus.canceled,
                where=Job.id.in_(canceled),
                settings=settings,
                error_code="canceled",
                error_message="canceled on request while running",
                batch_hook=False,
            )
        for attempts, job_ids in out_of_attempts.items():
            ended += end_jobs(
                session,
                JobStatus.failed,
                where=Job.id.in_(job_ids),
                settings=settings,
                error_code=WORKER_LOST,
                error_message=(
                    f"the worker running this job stopped {attempts} times; it was "
                    "not run again (a job that crashes its worker every time)"
                ),
                batch_hook=False,
            )
        end_batches_if_done(session, {j.batch_id for j in ended if j.batch_id is not None})
    return Expired(requeued=requeued, failed=[(j.id, j.delivery_id) for j in ended])


@dataclass(frozen=True)
class QueueCounts:
    queued: dict[str, int]
    running: int


def queue_counts(queues: Sequence[str]) -> QueueCounts:
    """Queued jobs per queue and running jobs in all, read in one snapshot: one statement of
    scalar subqueries, since under READ COMMITTED each statement takes its own snapshot, and
    a claim between two statements would count its job both queued and running (the reaper
    then sees a message missing that is not). Each subquery reads its own partial index only
    (index-only: the backlog's entries, no finished job)."""
    per_queue = [
        select(func.count()).select_from(Job).where(QUEUED, Job.queue == q).scalar_subquery()
        for q in queues
    ]
    running = (
        select(func.count())
        .select_from(Job)
        .where(RUNNING, Job.queue.in_(list(queues)))
        .scalar_subquery()
    )
    with session_scope() as session:
        row = session.execute(select(running, *per_queue)).one()
    return QueueCounts(
        queued={q: int(n or 0) for q, n in zip(queues, row[1:], strict=True)},
        running=int(row[0] or 0),
    )


def oldest_queued(queue: str, n: int) -> list[str]:
    with session_scope() as session:
        return list(
            session.scalars(
                select(Job.id)
                .where(QUEUED, Job.queue == queue)
                .order_by(Job.created_at, Job.id)
                .limit(n)
            ).all()
        )
