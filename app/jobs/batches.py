"""Batches (issue 13): many jobs submitted together, watched and ended as one. Here: making
a batch, adding inputs, sealing and canceling it. Its state and its end (exactly once) are
app/jobs/batch_state.py's, re-exported here for the API and the reaper.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.errors import ErrorCode, ServiceError
from app.infra import blobs
from app.infra.db import session_scope, utcnow
from app.infra.models import Batch, IdempotencyKey, Job, JobStatus
from app.infra.notify import publish_cancel
from app.jobs.batch_state import UNFINISHED as UNFINISHED
from app.jobs.batch_state import UNFINISHED_SQL as UNFINISHED_SQL
from app.jobs.batch_state import Eta as Eta
from app.jobs.batch_state import Stats as Stats
from app.jobs.batch_state import batch_event as batch_event
from app.jobs.batch_state import end_finished_batches as end_finished_batches
from app.jobs.batch_state import end_if_done as end_if_done
from app.jobs.batch_state import end_if_done_locked
from app.jobs.batch_state import eta as eta
from app.jobs.batch_state import iter_jobs as iter_jobs
from app.jobs.batch_state import on_job_finished as on_job_finished
from app.jobs.batch_state import stats as stats
from app.jobs.batch_state import status_of as status_of
from app.jobs.lifecycle import end_jobs
from app.jobs.submission import enqueue_jobs
from app.settings import Settings

log = logging.getLogger(__name__)

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
            if seal:
                batch.sealed_at = now
                session.flush()
                end_if_done_locked(session, batch)
    except IntegrityError:
        if idempotency_key is None:
            raise
        replay = _replay(api_key_id, idempotency_key, fingerprint, inputs)
        if replay is None:
            raise
        return replay
    _after_add(added, settings)
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
    known = _known_jobs(session, batch, inputs)
    to_send: list[str] = []
    if known.retry:
        _requeue(session, known.retry, now=now)
        to_send.extend(known.retry)
    fresh = [i for i in inputs if i.idempotency_key is None or i.idempotency_key not in known.jobs]
    if fresh and (batch.sealed_at is not None or batch.canceled_at is not None):
        raise ServiceError(
            409,
            "batch_sealed",
            f"batch {batch.id} is {status_of(batch)}: it takes no more inputs",
        )
    accepted: list[Accepted] = []
    dropped: list[str] = []
    # Inputs unusable as they came (not audio, too long): their jobs are born failed, so a
    # bad file is reported in the results instead of blocking the whole batch.
    unusable: defaultdict[tuple[str, str | None], list[str]] = defaultdict(list)
    for n, item in enumerate(inputs):
        hit = known.jobs.get(item.idempotency_key) if item.idempotency_key is not None else None
        if hit is not None:
            accepted.append(_accept_known(session, item, hit, known.no_audio, dropped))
            continue
        accepted.append(_add_job(session, batch, item, n, settings=settings, now=now))
        if item.error_code is not None:
            unusable[item.error_code, item.error_message].append(item.job_id)
        else:
            to_send.append(item.job_id)
        if item.idempotency_key is not None:
            # A key repeated inside one request is one input too.
            known.jobs[item.idempotency_key] = (item.job_id, JobStatus.queued, item.custom_id)
    _fail_unusable(session, unusable, settings=settings)
    return _Added(accepted, to_send, dropped)


@dataclass
class _Known:
    """The batch's jobs for a request's idempotency keys, as (job id, status, custom_id)."""

    jobs: dict[str, tuple[str, str, str | None]]
    # Jobs the broker refused (queue_unavailable) in a batch not yet ended: sent again now.
    retry: list[str]
    # Retried jobs whose audio went when the broker refused them (keep_audio_days 0): the
    # resent upload becomes their audio instead of being dropped as a duplicate.
    no_audio: set[str]


def _known_jobs(session: Session, batch: Batch, inputs: Sequence[NewInput]) -> _Known:
    known = _Known({}, [], set())
    keys = [i.idempotency_key for i in inputs if i.idempotency_key is not None]
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
                known.retry.append(row.id)
                if row.audio_blob is None and row.audio_url is None:
                    known.no_audio.add(row.id)
            known.jobs[row.idempotency_key] = (row.id, status, row.custom_id)
    return known


def _requeue(session: Session, job_ids: list[str], *, now: datetime) -> None:
    session.execute(
        update(Job)
        .where(Job.id.in_(job_ids), Job.error_code == QUEUE_UNAVAILABLE)
        .values(
            status=JobStatus.queued,
            error_code=None,
            error_message=None,
            finished_at=None,
            enqueued_at=now,
        )
    )


def _accept_known(
    session: Session,
    item: NewInput,
    hit: tuple[str, str, str | None],
    no_audio: set[str],
    dropped: list[str],
) -> Accepted:
    """An input the batch already has: no new job; its upload kept only as lost audio's stand-in."""
    job_id, status, custom_id = hit
    if item.audio_blob is not None and item.error_code is None and job_id in no_audio:
        no_audio.discard(job_id)
        session.execute(update(Job).where(Job.id == job_id).values(audio_blob=item.audio_blob))
    elif item.audio_blob is not None:
        dropped.append(item.audio_blob)
    return Accepted(job_id, custom_id, item.idempotency_key, status, True)


def _add_job(
    session: Session,
    batch: Batch,
    item: NewInput,
    n: int,
    *,
    settings: Settings,
    now: datetime,
) -> Accepted:
    """The job of the request's ``n``-th input (an unusable one's is then ended as failed)."""
    failed = item.error_code is not None
    session.add(
        Job(
            id=item.job_id,
            api_key_id=batch.api_key_id,
            batch_id=batch.id,
            status=JobStatus.queued,
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
        )
    )
    status = JobStatus.failed if failed else JobStatus.queued
    return Accepted(item.job_id, item.custom_id, item.idempotency_key, status, False)


def _fail_unusable(
    session: Session,
    unusable: dict[tuple[str, str | None], list[str]],
    *,
    settings: Settings,
) -> None:
    for (code, message), job_ids in unusable.items():
        end_jobs(
            session,
            JobStatus.failed,
            where=Job.id.in_(job_ids),
            settings=settings,
            error_code=code,
            error_message=message,
        )


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
            end_if_done_locked(session, batch)
    return batch


@dataclass(frozen=True)
class Canceled:
    batch: Batch
    canceled_jobs: int
    cancel_requested: int  # running jobs asked to stop


def cancel(*, batch_id: str, api_key_id: int, settings: Settings) -> Canceled:
    """Queued jobs are canceled now; running ones are marked ``cancel_requested_at`` for
    their worker to stop."""
    now = utcnow()
    with session_scope() as session:
        batch = owned_batch(session, batch_id=batch_id, api_key_id=api_key_id, lock=True)
        if batch.finished_at is not None and batch.canceled_at is None:
            raise ServiceError(409, "batch_finished", f"batch {batch.id} has already completed")
        batch.canceled_at = batch.canceled_at or now
        batch.sealed_at = batch.sealed_at or now
        canceled = end_jobs(
            session,
            JobStatus.canceled,
            # Guarded: a worker that claimed one first keeps it.
            where=and_(Job.batch_id == batch.id, Job.status == JobStatus.queued),
            settings=settings,
            error_code=BATCH_CANCELED_CODE,
            error_message="canceled with its batch",
            # Canceled batch jobs never run: their audio goes now, whatever retention keeps.
            audio_even_if_kept=True,
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
        # With no queued job left to cancel, no job's end looked at the batch.
        end_if_done_locked(session, batch)
    publish_cancel(asked, redis_url=settings.redis_url)
    return Canceled(batch, len(canceled), len(asked))
