"""Batches (issue 13): many jobs submitted together, watched and ended as one.

A batch's state is derived from its jobs (Postgres is the truth); its row only records what
the jobs cannot say: no more inputs (``sealed_at``), canceled, and ended (``finished_at``,
set exactly once, which is what fires the batch webhook).

Exactly once: whoever may end a batch (a worker finishing its last job, a cancel, a seal,
a reader noticing) first locks the batch row, then counts the unfinished jobs in a fresh
statement, then sets ``finished_at`` with an UPDATE guarded by ``finished_at IS NULL``.
Two workers finishing the last two jobs at the same moment queue on the lock; the second
one's count (a new snapshot under READ COMMITTED) sees the first one's job finished.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, text, tuple_, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.errors import ErrorCode, ServiceError
from app.infra import blobs
from app.infra.db import get_sessionmaker, session_scope, utcnow
from app.infra.models import (
    TERMINAL_STATUSES,
    Batch,
    DeliveryStatus,
    IdempotencyKey,
    Job,
    JobStatus,
    WebhookDelivery,
)
from app.infra.notify import publish_cancel
from app.infra.queue import send_delivery
from app.jobs.lifecycle import drop_ended_audio
from app.jobs.serialize import iso
from app.jobs.submission import enqueue_jobs
from app.settings import Settings

log = logging.getLogger(__name__)

UNFINISHED = (JobStatus.queued, JobStatus.running)
# A literal, so the planner matches it to ix_jobs_batch_unfinished (app/infra/models.py).
UNFINISHED_SQL = text("jobs.status IN ('queued', 'running')")
BATCH_CANCELED_CODE = "batch_canceled"
QUEUE_UNAVAILABLE = "queue_unavailable"  # app.jobs.submission's verdict when the broker is down


@dataclass(frozen=True)
class NewInput:
    """One input, checked and (for uploads) already in the blob store under ``job_id``."""

    job_id: str
    options: dict[str, Any]  # TranscribeOptions.to_json()
    custom_id: str | None
    source_name: str | None
    idempotency_key: str | None
    audio_blob: str | None = None
    audio_url: str | None = None
    input_length_ms: int | None = None
    content_sha256: str | None = None
    # Set when the input itself is unusable (not audio, too long): its job is born failed,
    # so a bad file is reported in the results instead of blocking the whole batch.
    error_code: str | None = None
    error_message: str | None = None


@dataclass(frozen=True)
class Accepted:
    job_id: str
    custom_id: str | None
    idempotency_key: str | None
    status: str
    duplicate: bool  # this idempotency key was already in the batch: no new job


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


def owned_batch(session: Session, *, batch_id: str, api_key_id: int, lock: bool = False) -> Batch:
    """Another tenant's batch is indistinguishable from a missing one: 404."""
    batch = (
        session.get(Batch, batch_id, with_for_update=lock or None) if batch_id.isalnum() else None
    )
    if batch is None or batch.api_key_id != api_key_id:
        raise ServiceError(404, "batch_not_found", f"no batch {batch_id!r}")
    return batch


# Batch keys live in idempotency_keys beside single-job keys, under a prefix with a space: a
# single submission's key is printable ASCII without spaces, so the two never meet.
BATCH_KEY_PREFIX = "batch "
# A batch keeps its key as long as it exists, so its fingerprint must too.
BATCH_KEY_TTL = timedelta(days=365 * 100)


@dataclass(frozen=True)
class Created:
    batch: Batch
    accepted: list[Accepted]
    created: bool  # False: the batch this idempotency key already made (a replay)


def create_batch(
    *,
    api_key_id: int,
    idempotency_key: str | None,
    fingerprint: str,
    webhook_url: str | None,
    default_options: dict[str, Any],
    inputs: Sequence[NewInput],
    seal: bool,
    settings: Settings,
) -> Created:
    """A new batch with its inputs (sealed unless ``seal`` is false), in one transaction: a
    refused request leaves no batch behind, and a concurrent create with the same key waits
    on the unique index and then replays this one whole. The same key with another request
    (``fingerprint``) is a 409, as on the single-job route."""
    if idempotency_key is not None:
        replay = _replay(api_key_id, idempotency_key, fingerprint, inputs)
        if replay is not None:
            return replay
    now = utcnow()
    batch = Batch(
        api_key_id=api_key_id,
        idempotency_key=idempotency_key,
        webhook_url=webhook_url,
        default_options=default_options,
        created_at=now,
    )
    try:
        with session_scope() as session:
            session.add(batch)
            if idempotency_key is not None:
                session.add(
                    IdempotencyKey(
                        api_key_id=api_key_id,
                        key=BATCH_KEY_PREFIX + idempotency_key,
                        fingerprint=fingerprint,
                        created_at=now,
                        expires_at=now + BATCH_KEY_TTL,
                    )
                )
            session.flush()  # a concurrent create of the same key fails here, not after
            added = _add_jobs(session, batch, inputs, settings=settings, now=now)
            delivery_id = None
            if seal:
                batch.sealed_at = now
                session.flush()
                delivery_id = _end_if_done(session, batch)
    except IntegrityError:
        if idempotency_key is None:
            raise
        replay = _replay(api_key_id, idempotency_key, fingerprint, inputs)
        if replay is None:
            raise
        return replay
    _after_add(added, settings)
    if delivery_id is not None:
        send_delivery(delivery_id)
    return Created(batch, added.accepted, created=True)


def _replay(
    api_key_id: int, idempotency_key: str, fingerprint: str, inputs: Sequence[NewInput]
) -> Created | None:
    """The batch this key made, with the jobs the request that made it created (its first
    ones, in order), or None. Makes nothing: a replay never adds inputs."""
    with session_scope() as session:
        found = session.scalars(
            select(Batch).where(
                Batch.api_key_id == api_key_id, Batch.idempotency_key == idempotency_key
            )
        ).one_or_none()
        if found is None:
            return None
        stored = session.get(IdempotencyKey, (api_key_id, BATCH_KEY_PREFIX + idempotency_key))
        # A batch made before fingerprints were kept has none: it is taken as the same.
        if stored is not None and stored.fingerprint != fingerprint:
            raise ServiceError.of(
                ErrorCode.idempotency_key_reused,
                "this Idempotency-Key made a batch from a different request",
                field="Idempotency-Key",
            )
        distinct = len({i.idempotency_key or n for n, i in enumerate(inputs)})
        jobs = list(
            session.execute(
                select(Job.id, Job.custom_id, Job.status)
                .where(Job.batch_id == found.id)
                .order_by(Job.created_at, Job.id)
                .limit(distinct)
            )
        )
    accepted: list[Accepted] = []
    by_key: dict[str, Accepted] = {}
    rows = iter(jobs)
    for item in inputs:
        hit = by_key.get(item.idempotency_key) if item.idempotency_key is not None else None
        if hit is None:
            row = next(rows, None)
            if row is None:
                break
            hit = Accepted(row.id, row.custom_id, item.idempotency_key, row.status, True)
            if item.idempotency_key is not None:
                by_key[item.idempotency_key] = hit
        accepted.append(hit)
    return Created(found, accepted, created=False)


@dataclass
class _Added:
    accepted: list[Accepted]
    to_send: list[str]
    dropped: list[str]


def add_inputs(
    *, batch_id: str, api_key_id: int, inputs: Sequence[NewInput], settings: Settings
) -> list[Accepted]:
    """One job per new input, in one transaction under the batch's lock, then enqueued.

    An input whose idempotency key the batch already holds makes no job (its blob is
    dropped): a client that died after the server accepted a chunk can send it again."""
    with session_scope() as session:
        batch = owned_batch(session, batch_id=batch_id, api_key_id=api_key_id, lock=True)
        added = _add_jobs(session, batch, inputs, settings=settings, now=utcnow())
    _after_add(added, settings)
    return added.accepted


def _after_add(added: _Added, settings: Settings) -> None:
    for name in added.dropped:
        blobs.delete_blob(name)
    # Only after the commit: a worker must never receive an id it cannot read yet.
    enqueue_jobs(added.to_send, queue=settings.queue_bulk, settings=settings)


def _add_jobs(
    session: Session,
    batch: Batch,
    inputs: Sequence[NewInput],
    *,
    settings: Settings,
    now: datetime,
) -> _Added:
    """The caller holds the batch row (locked, or new in this transaction)."""
    api_key_id = batch.api_key_id
    accepted: list[Accepted] = []
    to_send: list[str] = []
    retry: list[str] = []
    # Retried jobs whose audio went when the broker refused them (keep_audio_days 0): the
    # resent upload becomes their audio instead of being dropped as a duplicate.
    no_audio: set[str] = set()
    dropped: list[str] = []
    keys = [i.idempotency_key for i in inputs if i.idempotency_key is not None]
    known: dict[str, tuple[str, str, str | None]] = {}
    for start in range(0, len(keys), 500):
        for row in session.execute(
            select(
                Job.idempotency_key,
                Job.id,
                Job.status,
                Job.custom_id,
                Job.error_code,
                Job.audio_blob,
                Job.audio_url,
            ).where(Job.batch_id == batch.id, Job.idempotency_key.in_(keys[start : start + 500]))
        ):
            status = row.status
            if row.error_code == QUEUE_UNAVAILABLE and batch.finished_at is None:
                # The broker was down when it was accepted: sent again now, not failed.
                status = JobStatus.queued
                retry.append(row.id)
                if row.audio_blob is None and row.audio_url is None:
                    no_audio.add(row.id)
            known[row.idempotency_key] = (row.id, status, row.custom_id)
    if retry:
        session.execute(
            update(Job)
            .where(Job.id.in_(retry), Job.error_code == QUEUE_UNAVAILABLE)
            .values(
                status=JobStatus.queued,
                error_code=None,
                error_message=None,
                finished_at=None,
                enqueued_at=now,
            )
        )
        to_send.extend(retry)
    fresh = [i for i in inputs if i.idempotency_key is None or i.idempotency_key not in known]
    if fresh and (batch.sealed_at is not None or batch.canceled_at is not None):
        raise ServiceError(
            409,
            "batch_sealed",
            f"batch {batch.id} is {status_of(batch)}: it takes no more inputs",
        )
    for n, item in enumerate(inputs):
        hit = known.get(item.idempotency_key) if item.idempotency_key is not None else None
        if hit is not None:
            if item.audio_blob is not None and item.error_code is None and hit[0] in no_audio:
                no_audio.discard(hit[0])
                session.execute(
                    update(Job).where(Job.id == hit[0]).values(audio_blob=item.audio_blob)
                )
            elif item.audio_blob is not None:
                dropped.append(item.audio_blob)
            accepted.append(Accepted(hit[0], hit[2], item.idempotency_key, hit[1], True))
            continue
        failed = item.error_code is not None
        session.add(
            Job(
                id=item.job_id,
                api_key_id=api_key_id,
                batch_id=batch.id,
                status=JobStatus.failed if failed else JobStatus.queued,
                queue=settings.queue_bulk,
                options=item.options,
                audio_blob=None if failed else item.audio_blob,
                audio_url=item.audio_url,
                input_length_ms=item.input_length_ms,
                custom_id=item.custom_id,
                source_name=item.source_name,
                idempotency_key=item.idempotency_key,
                content_sha256=item.content_sha256,
                # Results list in (created_at, id) order: a microsecond apart keeps a
                # request's inputs in the order they were sent.
                created_at=now + timedelta(microseconds=n),
                enqueued_at=None if failed else now,
                finished_at=now if failed else None,
                error_code=item.error_code,
                error_message=item.error_message,
            )
        )
        if item.idempotency_key is not None:
            # A key repeated inside one request is one input too.
            known[item.idempotency_key] = (item.job_id, JobStatus.queued, item.custom_id)
        status = JobStatus.failed if failed else JobStatus.queued
        accepted.append(Accepted(item.job_id, item.custom_id, item.idempotency_key, status, False))
        if not failed:
            to_send.append(item.job_id)
    return _Added(accepted, to_send, dropped)


def seal(*, batch_id: str, api_key_id: int) -> Batch:
    """No more inputs: from now on the batch ends when its last job does."""
    with session_scope() as session:
        batch = owned_batch(session, batch_id=batch_id, api_key_id=api_key_id, lock=True)
        if batch.sealed_at is None:
            if not session.scalar(select(func.count()).where(Job.batch_id == batch.id)):
                raise ServiceError(
                    409, "batch_empty", "the batch has no inputs: add some, or cancel it"
                )
            batch.sealed_at = utcnow()
            session.flush()
            delivery_id = _end_if_done(session, batch)
        else:
            delivery_id = None
    if delivery_id is not None:
        send_delivery(delivery_id)
    return batch


@dataclass(frozen=True)
class Canceled:
    batch: Batch
    canceled_jobs: int
    cancel_requested: int  # running jobs asked to stop


def cancel(*, batch_id: str, api_key_id: int, settings: Settings) -> Canceled:
    """Queued jobs are canceled now (guarded: a worker that claimed one first keeps it);
    running ones are marked ``cancel_requested_at`` for their worker to stop."""
    now = utcnow()
    with session_scope() as session:
        batch = owned_batch(session, batch_id=batch_id, api_key_id=api_key_id, lock=True)
        if batch.finished_at is not None and batch.canceled_at is None:
            raise ServiceError(409, "batch_finished", f"batch {batch.id} has already completed")
        batch.canceled_at = batch.canceled_at or now
        batch.sealed_at = batch.sealed_at or now
        canceled = list(
            session.scalars(
                update(Job)
                .where(Job.batch_id == batch.id, Job.status == JobStatus.queued)
                .values(
                    status=JobStatus.canceled,
                    finished_at=now,
                    error_code=BATCH_CANCELED_CODE,
                    error_message="canceled with its batch",
                )
                .returning(Job.id)
            )
        )
        asked = list(
            session.scalars(
                update(Job)
                .where(
                    Job.batch_id == batch.id,
                    Job.status == JobStatus.running,
                    Job.cancel_requested_at.is_(None),
                )
                .values(cancel_requested_at=now)
                .returning(Job.id)
            )
        )
        session.flush()
        delivery_id = _end_if_done(session, batch)
    publish_cancel(asked, redis_url=settings.redis_url)
    if delivery_id is not None:
        send_delivery(delivery_id)
    # Canceled batch jobs never run: their audio goes now, whatever retention keeps.
    drop_ended_audio(canceled, settings=settings, even_if_kept=True)
    return Canceled(batch, len(canceled), len(asked))


def on_job_finished(session: Session, job: Job) -> str | None:
    """Call inside the transaction that made ``job`` terminal, before it commits.

    Ends the job's batch if this was its last unfinished job; returns the id of the batch
    webhook delivery to send (``app.infra.queue.send_delivery``) once the transaction committed,
    or None. The outbox row commits with the job, so the event cannot be lost between them
    (the reaper re-sends a delivery whose send was lost)."""
    if job.batch_id is None:
        return None
    session.flush()  # our job's new status must be visible to the count below
    batch = session.get(Batch, job.batch_id, with_for_update=True, populate_existing=True)
    if batch is None:
        return None
    return _end_if_done(session, batch)


def end_if_done(batch_id: str) -> None:
    """A safety net for any path that finished a batch's last job without the hook (and
    for readers): end the batch now if it is sealed and nothing is left."""
    with session_scope() as session:
        batch = session.get(Batch, batch_id, with_for_update=True, populate_existing=True)
        delivery_id = _end_if_done(session, batch) if batch is not None else None
    if delivery_id is not None:
        send_delivery(delivery_id)


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


def _end_if_done(session: Session, batch: Batch) -> str | None:
    """The caller holds the batch row's lock. Returns the batch delivery id, if one was made."""
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
    delivery = WebhookDelivery(
        job_id=None,  # the batch's own event, not one of its jobs'
        batch_id=batch.id,
        url=batch.webhook_url,
        body=json.dumps(batch_event(batch, stats(session, batch.id))),
        status=DeliveryStatus.pending,
        next_attempt_at=now,
        dispatched_at=now,
    )
    session.add(delivery)
    session.flush()
    return delivery.id


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
