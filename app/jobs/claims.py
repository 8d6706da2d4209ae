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

import dataclasses
import heapq
import logging
import socket
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from itertools import accumulate
from typing import Any

from sqlalchemy import (
    JSON,
    Integer,
    Row,
    String,
    Text,
    and_,
    bindparam,
    func,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Session

from app.infra.db import UTCDateTime, session_scope, utcnow
from app.infra.models import Job, JobStatus
from app.jobs.batch_state import end_batches_if_done
from app.jobs.lifecycle import EndedJob, Ending, end_jobs, end_jobs_each
from app.jobs.lifecycle import Outcome as Outcome  # how the worker names it: claims.Outcome
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
_KEYS_WITH_WORK_SQL = """
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
            WHERE r.status = 'running' AND r.api_key_id = k.id) AS running{more}
    FROM k WHERE k.id IS NOT NULL
    """
_KEYS_WITH_WORK = text(_KEYS_WITH_WORK_SQL.format(more="")).columns(
    id=Integer, last_started=UTCDateTime, running=Integer
)
# The same, and how many jobs each key has queued in this queue, counted up to the ``n``
# claims to plan (one bounded index range per key): enough to know where a key runs dry.
# ORDER BY the claim index's own order: without it, the planner's "LIMIT stops early" bet
# took a sequential scan over every job claimed since the backlog landed, per key.
_KEYS_WITH_WORK_COUNTED = text(
    _KEYS_WITH_WORK_SQL.format(
        more=""",
           (SELECT count(*) FROM (
                SELECT 1 FROM jobs q
                WHERE q.status = 'queued' AND q.queue = :queue AND q.api_key_id = k.id
                ORDER BY q.created_at, q.id LIMIT :n) AS q) AS queued"""
    )
).columns(id=Integer, last_started=UTCDateTime, running=Integer, queued=Integer)

# The jobs a plan gives one queue's keys, all claimed in one statement: per key its oldest
# ``take`` jobs, ``SKIP LOCKED`` (a job another claimer holds is stepped over, never waited
# on), each started at the time of its place in the plan, ``starts[slot]``: the key's first
# slot plus the job's rank among the key's picks. Statuses are literals (see QUEUED). The
# picked ids reach the UPDATE as one array, ``id = ANY(...)``: the primary key, probed once
# per job. A join on the picks was planned for the LIMITs' worst case (a hash of every
# queued job, a sequential scan per claim).
_CLAIM_PLANNED = (
    text(
        """
    WITH picked AS (
        SELECT j.id,
               w.first_slot - 1
               + row_number() OVER (PARTITION BY w.key_id ORDER BY j.created_at, j.id) AS slot
        FROM unnest(CAST(:keys AS integer[]), CAST(:takes AS integer[]),
                    CAST(:first_slots AS integer[])) AS w(key_id, take, first_slot)
        CROSS JOIN LATERAL (
            SELECT jobs.id, jobs.created_at FROM jobs
            WHERE jobs.status = 'queued' AND jobs.queue = :queue AND jobs.api_key_id = w.key_id
            ORDER BY jobs.created_at, jobs.id
            LIMIT w.take
            FOR UPDATE SKIP LOCKED
        ) AS j
    ),
    p AS (SELECT array_agg(id) AS ids, array_agg(slot) AS slots FROM picked)
    UPDATE jobs
    SET status = 'running',
        started_at = (:starts)[p.slots[array_position(p.ids, jobs.id)]],
        attempts = jobs.attempts + 1,
        lease_expires_at = :lease,
        worker = :worker
    FROM p
    WHERE jobs.id = ANY(p.ids) AND jobs.status = 'queued'
    RETURNING p.slots[array_position(p.ids, jobs.id)] AS slot, jobs.id AS id,
              jobs.attempts AS attempts, jobs.options AS options,
              jobs.audio_blob AS audio_blob, jobs.audio_url AS audio_url,
              jobs.queue AS queue, jobs.input_length_ms AS input_length_ms
    """
    )
    .bindparams(
        bindparam("starts", type_=ARRAY(UTCDateTime())),
        bindparam("lease", type_=UTCDateTime()),
    )
    .columns(
        slot=Integer,
        id=String,
        attempts=Integer,
        options=JSON,
        audio_blob=String,
        audio_url=Text,
        queue=String,
        input_length_ms=Integer,
    )
)
# Rounds of plan and claim per queue when other claimers hold some of the planned jobs:
# each round drops the keys it found short, so rounds run out; the bound keeps a claim
# under heavy contention short (it returns fewer, the worker asks again).
CLAIM_ROUNDS = 8


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


def _fairness(key: int, last_started: datetime | None, running: int) -> tuple[int, datetime, int]:
    """Fewest jobs in flight first, then the key served least recently (never: first)."""
    return (running, (last_started or datetime.min).replace(tzinfo=None), key)


def _fair_order(keys: dict[int, datetime | None], running: dict[int, int]) -> list[int]:
    return sorted(keys, key=lambda k: _fairness(k, keys[k], running.get(k, 0)))


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
    """Start up to ``n`` jobs by the same policy as :func:`claim_next`, in one transaction,
    as ``n`` claims one after the other would: each claim sees the ones before it (the fair
    order, the per-key cap), and a worker claiming for many threads at once pays one
    commit, not one per job. On Postgres in a constant number of statements: see
    :func:`_claim_set`."""
    with session_scope() as session:
        if session.get_bind().dialect.name == "sqlite":
            return _claim_one_by_one(session, n, queues=queues, settings=settings, worker=worker)
        return _claim_set(session, n, queues=queues, settings=settings, worker=worker)


def _claim_one_by_one(
    session: Session, n: int, *, queues: Sequence[str], settings: Settings, worker: str
) -> ClaimBatch:
    """SQLite (embedded, one host, a few threads): no unnest, no row locks to skip."""
    jobs: list[ClaimedJob] = []
    for _ in range(n):
        got = _claim_in(session, queues=queues, settings=settings, worker=worker)
        if got.job is None:
            return ClaimBatch(jobs, capped=got.capped)
        jobs.append(got.job)
    return ClaimBatch(jobs)


@dataclass(frozen=True)
class _Work:
    """One key's work in one queue, as one read saw it."""

    last_started: datetime | None
    running: int  # in any queue
    queued: int  # in this queue, counted up to the claims still to plan


def _claim_set(
    session: Session, n: int, *, queues: Sequence[str], settings: Settings, worker: str
) -> ClaimBatch:
    """Per queue, in order: read its keys' work once, plan in Python the keys ``n``
    sequential claims would take (:func:`_plan`), claim the whole plan in one statement.
    A queue only gets what the earlier ones left unplanned, as a claim moves on to the next
    queue only when the earlier has nothing claimable."""
    base = utcnow()
    got: list[tuple[int, ClaimedJob]] = []  # (place in the plan, job)
    placed = 0
    running: dict[int, int] = {}  # per key, in any queue
    left: dict[tuple[str, int], int] = {}  # (queue, key): queued jobs, less those claimed
    for queue in queues:
        if len(got) == n:
            break
        claimed, placed = _claim_queue(
            session,
            queue,
            n - len(got),
            _Plan(base, placed, settings.key_max_in_flight),
            running=running,
            left=left,
            settings=settings,
            worker=worker,
        )
        got += claimed
    cap = settings.key_max_in_flight
    capped = (
        len(got) < n
        and cap > 0
        and any(queued > 0 and running[key] >= cap for (_, key), queued in left.items())
    )
    return ClaimBatch([job for _, job in sorted(got, key=lambda g: g[0])], capped=capped)


@dataclass(frozen=True)
class _Plan:
    """What a plan needs besides the keys' work: the cap, and where its claims fall. The
    ``place``-th claim of a ``claim_many`` starts at ``base`` + ``place`` microseconds, so
    that the next claim's fair order (served least recently first) is the one sequential
    claims would leave."""

    base: datetime
    first: int  # this plan's first place
    cap: int  # key_max_in_flight, 0: none

    def start(self, place: int) -> datetime:
        return self.base + timedelta(microseconds=place)


def _claim_queue(
    session: Session,
    queue: str,
    n: int,
    plan_at: _Plan,
    *,
    running: dict[int, int],
    left: dict[tuple[str, int], int],
    settings: Settings,
    worker: str,
) -> tuple[list[tuple[int, ClaimedJob]], int]:
    """Up to ``n`` jobs of one queue, with their places; and the next free place. Where
    other claimers hold planned jobs (fewer came back), the queue is read and planned again
    without the keys found short. ``running`` and ``left`` follow what is claimed."""
    got: list[tuple[int, ClaimedJob]] = []
    short: set[int] = set()
    first = plan_at.first
    for _ in range(CLAIM_ROUNDS):
        work = _read_work(session, queue, n - len(got))
        running.update({k: w.running for k, w in work.items()})
        left.update({(queue, k): w.queued for k, w in work.items()})
        at = dataclasses.replace(plan_at, first=first)
        plan = _plan({k: w for k, w in work.items() if k not in short}, n - len(got), at)
        if not plan:
            break
        claimed = _claim_planned(session, queue, plan, at, settings=settings, worker=worker)
        took = Counter(plan[place - first] for place, _ in claimed)
        for key, count in took.items():
            running[key] += count
            left[(queue, key)] -= count
        short |= {key for key, count in Counter(plan).items() if took[key] < count}
        got += claimed
        first += len(plan)
        if len(claimed) == len(plan) or len(got) == n:
            break
    return got, first


def _read_work(session: Session, queue: str, n: int) -> dict[int, _Work]:
    rows = session.execute(_KEYS_WITH_WORK_COUNTED, {"queue": queue, "n": n}).all()
    return {r.id: _Work(r.last_started, int(r.running), int(r.queued)) for r in rows}


def _plan(work: Mapping[int, _Work], n: int, at: _Plan) -> list[int]:
    """The keys that ``n`` claims one after the other would take ``work`` from, in order:
    each sees the ones before it (its key has one more running, one fewer queued, and was
    served last); a key at the cap or out of queued jobs takes no more."""
    running = {k: w.running for k, w in work.items()}
    queued = {k: w.queued for k, w in work.items()}

    def claimable(key: int) -> bool:
        return queued[key] > 0 and not (at.cap and running[key] >= at.cap)

    heap = [_fairness(k, w.last_started, w.running) for k, w in work.items() if claimable(k)]
    heapq.heapify(heap)
    plan: list[int] = []
    while heap and len(plan) < n:
        key = heapq.heappop(heap)[2]
        running[key] += 1
        queued[key] -= 1
        if claimable(key):
            heapq.heappush(heap, _fairness(key, at.start(at.first + len(plan)), running[key]))
        plan.append(key)
    return plan


def _claim_planned(
    session: Session, queue: str, plan: Sequence[int], at: _Plan, *, settings: Settings, worker: str
) -> list[tuple[int, ClaimedJob]]:
    """Claim ``plan`` (one key per claim) in one statement; the jobs with their places."""
    slots, per_key = _plan_params(plan, at)
    rows = session.execute(
        _CLAIM_PLANNED,
        {
            **per_key,
            "queue": queue,
            "lease": at.base + timedelta(seconds=settings.job_lease_s),
            "worker": worker,
        },
    ).all()
    return [(slots[r.slot - 1], _claimed(r)) for r in rows]


def _plan_params(plan: Sequence[int], at: _Plan) -> tuple[list[int], dict[str, Any]]:
    """``_CLAIM_PLANNED``'s per-key parameters for ``plan``, and the place of each of its
    slots (1-based: each key's places in a row, keys in order of first appearance)."""
    places: dict[int, list[int]] = {}
    for i, key in enumerate(plan):
        places.setdefault(key, []).append(at.first + i)
    slots = [place for key_places in places.values() for place in key_places]
    takes = [len(p) for p in places.values()]
    return slots, {
        "keys": list(places),
        "takes": takes,
        "first_slots": list(accumulate(takes, initial=1))[:-1],
        "starts": [at.start(place) for place in slots],
    }


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
            Job.id,
            Job.attempts,
            Job.options,
            Job.audio_blob,
            Job.audio_url,
            Job.queue,
            Job.input_length_ms,
        )
    ).one_or_none()
    return None if row is None else _claimed(row)


def _claimed(row: Row[Any]) -> ClaimedJob:
    return ClaimedJob(
        id=row.id,
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
    """Store several runs' outcomes in one transaction, each as if alone, in a constant
    number of statements (``lifecycle.end_jobs_each``).

    The guard is the attempt number: a run may finish its job while it is ``running`` or,
    after its lease ran out, ``queued`` again but not yet claimed by anyone else (a stall
    or a Postgres outage longer than the lease), never once a newer run claimed it."""
    endings = [Ending(claimed.id, claimed.attempt, o) for claimed, o in outcomes]
    with session_scope() as session:
        ended = end_jobs_each(session, endings, settings=settings)
    # None: canceled, or a newer run owns it now.
    return [Finished(e is not None, None if e is None else e.delivery_id) for e in ended]


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
