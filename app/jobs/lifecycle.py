"""How a job ends: the one terminal transition, and the end of its audio.

``end_jobs`` (one outcome for the jobs a guard selects) and ``end_jobs_each`` (each job its
own outcome, the worker's finish of many runs at once) are the only code that makes a job
succeeded, failed or canceled, whoever ends it (the worker's finish, lease expiry, a cancel,
a batch cancel, a broker that was down, a batch input that was never audio); both build
their UPDATE with ``_ending``. In the caller's transaction they set the status, the
finish time and the metering, write the job's webhook event (app/jobs/outbox.py) and end
the job's batch if this was its last job (app/jobs/batch_state.py). After the commit they
delete the audio (``keep_audio_days`` 0), run the hooks registered with ``on_job_ended``
(the worker's metrics), wake the API's sync waiters and send the events.

Hooks are registered, never patched in: whoever imports whatever, every end runs them.

Audio is deleted after the commit, never before: a row must not point at a blob that is
gone if the transaction rolls back. A crash between the commit and the delete leaves a
finished job with audio, or a blob no row names; the retention purge (app/jobs/retention.py)
catches both.
"""

from __future__ import annotations

import json
import logging
import typing
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    ColumnElement,
    Float,
    Integer,
    String,
    Text,
    Update,
    and_,
    cast,
    column,
    func,
    literal,
    null,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Session, defer
from sqlalchemy.orm.attributes import set_committed_value
from sqlalchemy.orm.util import identity_key
from sqlalchemy.types import TypeEngine

from app.infra import blobs
from app.infra.db import session_scope, utcnow
from app.infra.models import TERMINAL_STATUSES, Job, JobStatus
from app.infra.notify import publish_done
from app.jobs.batch_state import end_batches_if_done
from app.jobs.outbox import JobEvent, add_job_events, after_commit
from app.jobs.serialize import webhook_payload
from app.settings import Settings

log = logging.getLogger(__name__)
CHUNK = 500
# A literal, so Postgres matches it to the unfinished-jobs partial index (app/infra/models.py);
# a bound parameter's generic plan would scan every job ever run.
UNFINISHED = text("jobs.status IN ('queued', 'running')")


@dataclass(frozen=True)
class EndedJob:
    """A job that ``end_jobs`` ended, as the after-commit hooks see it."""

    id: str
    status: JobStatus
    queue: str
    batch_id: str | None
    attempts: int
    enqueued_at: datetime | None
    started_at: datetime | None
    finished_at: datetime
    runtime_ms: int
    input_length_ms: int | None
    error_code: str | None
    delivery_id: str | None  # its webhook event, sent once the transaction commits


JobEndedHook = Callable[[Sequence[EndedJob]], None]
_ended_hooks: list[JobEndedHook] = []


def on_job_ended(hook: JobEndedHook) -> None:
    """Call ``hook`` with the jobs each committed transaction ended, in the process that
    ended them (once per hook, however often it is registered). It must not raise; if it
    does, the error is logged and the other hooks still run."""
    if hook not in _ended_hooks:
        _ended_hooks.append(hook)


def remove_job_ended_hook(hook: JobEndedHook) -> None:
    """Undo ``on_job_ended`` (tests register hooks of their own)."""
    if hook in _ended_hooks:
        _ended_hooks.remove(hook)


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


@dataclass(frozen=True)
class Ending:
    """One job's outcome, stored only while the job is unfinished and at this attempt."""

    job_id: str
    attempt: int
    outcome: Outcome


def end_jobs(
    session: Session,
    status: JobStatus,
    *,
    where: ColumnElement[bool],
    settings: Settings,
    result: dict[str, Any] | None = None,
    input_length_ms: int | None = None,
    runtime_ms: int = 0,
    tokens_generated: int = 0,
    tokens_input: int = 0,
    error_code: str | None = None,
    error_message: str | None = None,
    cancel_requested_at: datetime | None = None,
    audio_even_if_kept: bool = False,
    batch_hook: bool = True,
) -> list[EndedJob]:
    """End the unfinished jobs ``where`` selects, in the caller's transaction, all with
    this outcome; returns those it ended.

    ``where`` is the caller's guard and stays in the statement (a queued job only, this
    run's attempt only...), so a job another transaction took first is left alone; a job
    that already ended is never ended again. ``batch_hook`` False leaves the jobs' batches
    to the caller: ``batch_state.end_batches_if_done`` once for several calls, or not at all
    (its reason: see app/jobs/submission.py)."""
    _check_terminal(status)
    now = utcnow()
    optional: dict[str, Any] = {}
    if input_length_ms is not None:
        optional["input_length_ms"] = input_length_ms
    if cancel_requested_at is not None:
        optional["cancel_requested_at"] = cancel_requested_at
    ending = _ending(
        where,
        now,
        status=status,
        # SQL NULL, not JSON null: retention asks ``result IS NOT NULL``.
        result=null() if result is None else result,
        runtime_ms=runtime_ms,
        cost=_cost(runtime_ms, settings),
        tokens_generated=tokens_generated,
        tokens_input=tokens_input,
        error_code=error_code,
        error_message=error_message,
        **optional,
    )
    jobs = session.scalars(
        # The ended rows come back (their events need them) and refresh any copy of them
        # the session holds; rows the guard left alone did not change. Not the transcript:
        # it was just sent, and may be megabytes.
        ending.returning(Job).options(defer(Job.result)),
        execution_options={"populate_existing": True, "synchronize_session": False},
    ).all()
    for job in jobs:
        set_committed_value(job, "result", result)
    return _record(
        session,
        [(job, status) for job in jobs],
        now,
        settings=settings,
        audio_even_if_kept=audio_even_if_kept,
        batch_hook=batch_hook,
    )


def end_jobs_each(
    session: Session, endings: Sequence[Ending], *, settings: Settings, batch_hook: bool = True
) -> list[EndedJob | None]:
    """End each job with its own outcome, in the caller's transaction, as ``end_jobs`` would
    one by one, in a constant number of statements: one UPDATE for all (not one per job),
    one INSERT for their events, then each batch's end once (``batch_hook``). Returns, per
    ending in order, the ended job, or None where the job had ended already or a newer run
    owns it (another attempt); of the same job and attempt twice, the first counts."""
    for e in endings:
        _check_terminal(e.outcome.status)
    if session.get_bind().dialect.name == "sqlite":
        return _end_each_alone(session, endings, settings=settings, batch_hook=batch_hook)
    firsts: dict[tuple[str, int], Ending] = {}
    for e in endings:
        firsts.setdefault((e.job_id, e.attempt), e)
    if not firsts:
        return []
    now = utcnow()
    rows = session.execute(
        _each_statement(list(firsts.values()), now, settings),
        execution_options={"synchronize_session": False},
    ).all()
    # The update left the identity map alone: a copy the session holds is stale now.
    for r in rows:
        if (held := session.identity_map.get(identity_key(Job, r.id))) is not None:
            session.expire(held)
    outcomes = {key: e.outcome for key, e in firsts.items()}
    views = [_Ended(**r._asdict(), result=outcomes[(r.id, r.attempts)].result) for r in rows]
    ended = _record(
        session,
        [(v, outcomes[(v.id, v.attempts)].status) for v in views],
        now,
        settings=settings,
        audio_even_if_kept=False,
        batch_hook=batch_hook,
    )
    done = {(j.id, j.attempts): j for j in ended}
    return [done.pop((e.job_id, e.attempt), None) for e in endings]


def end_job(
    session: Session,
    job_id: str,
    status: JobStatus,
    *,
    where: ColumnElement[bool],
    settings: Settings,
    **outcome: Any,
) -> EndedJob | None:
    """``end_jobs`` for one job (``outcome``: its keywords): the ended job, or None if the
    guard left it alone."""
    ended = end_jobs(
        session, status, where=and_(Job.id == job_id, where), settings=settings, **outcome
    )
    return ended[0] if ended else None


def _check_terminal(status: JobStatus) -> None:
    if status not in TERMINAL_STATUSES:
        raise ValueError(f"{status!r} does not end a job")


def _cost(runtime_ms: int, settings: Settings) -> float:
    return round(runtime_ms / 1000 * settings.price_per_second, 10)


def _ending(where: ColumnElement[bool], now: datetime, status: Any, **outcome: Any) -> Update:
    """The UPDATE that ends the unfinished jobs ``where`` selects with ``status`` and
    ``outcome``: values (``end_jobs``), or columns of the per-job source that ``where``
    joins (``end_jobs_each``)."""
    # The one assignment of a terminal status in the code base (tests/test_lifecycle.py).
    return (
        update(Job)
        .where(UNFINISHED, where)
        .values(status=status, finished_at=now, lease_expires_at=None, **outcome)
    )


# What ``end_jobs_each`` reads back of each ended job: its EndedJob and its webhook event.
_RETURNED = (
    Job.id,
    Job.status,
    Job.queue,
    Job.batch_id,
    Job.attempts,
    Job.enqueued_at,
    Job.started_at,
    Job.runtime_ms,
    Job.cost,
    Job.tokens_generated,
    Job.tokens_input,
    Job.input_length_ms,
    Job.error_code,
    Job.error_message,
    Job.webhook_url,
)


def _each_statement(endings: Sequence[Ending], now: datetime, settings: Settings) -> Update:
    """One UPDATE ... FROM unnest(arrays) for all: the same statement text whatever the count
    (a prepared statement plans it once), each job joined to its own outcome and guard by
    primary key."""
    per_job: list[tuple[str, TypeEngine[Any], list[Any]]] = [
        ("id", String(), [e.job_id for e in endings]),
        ("attempt", Integer(), [e.attempt for e in endings]),
        ("status", String(), [str(e.outcome.status) for e in endings]),
        # Serialized here as the JSON column would be; None stays SQL NULL (retention asks
        # ``result IS NOT NULL``), never JSON null.
        ("result", Text(), [_json(e.outcome.result) for e in endings]),
        ("input_length_ms", Integer(), [e.outcome.input_length_ms for e in endings]),
        ("runtime_ms", Integer(), [e.outcome.runtime_ms for e in endings]),
        ("cost", Float(), [_cost(e.outcome.runtime_ms, settings) for e in endings]),
        ("tokens_generated", Integer(), [e.outcome.tokens_generated for e in endings]),
        ("tokens_input", Integer(), [e.outcome.tokens_input for e in endings]),
        ("error_code", String(), [e.outcome.error_code for e in endings]),
        ("error_message", Text(), [e.outcome.error_message for e in endings]),
    ]
    o = (
        func.unnest(*(literal(values, ARRAY(type_)) for _, type_, values in per_job))
        .table_valued(*(column(name, type_) for name, type_, _ in per_job))
        .render_derived(name="o")
    )
    return _ending(
        and_(Job.id == o.c.id, Job.attempts == o.c.attempt),
        now,
        status=o.c.status,
        result=cast(o.c.result, JSON),
        input_length_ms=func.coalesce(o.c.input_length_ms, Job.input_length_ms),
        runtime_ms=o.c.runtime_ms,
        cost=o.c.cost,
        tokens_generated=o.c.tokens_generated,
        tokens_input=o.c.tokens_input,
        error_code=o.c.error_code,
        error_message=o.c.error_message,
    ).returning(*_RETURNED)


def _json(result: dict[str, Any] | None) -> str | None:
    return None if result is None else json.dumps(result)


@dataclass(frozen=True)
class _Ended:
    """An ended job as ``end_jobs_each`` reads it back: what its EndedJob and its webhook
    payload (app/jobs/serialize.py) read of a Job, and nothing else (a payload that starts
    reading more fails here, loudly, rather than sending a None)."""

    id: str
    status: str
    queue: str
    batch_id: str | None
    attempts: int
    enqueued_at: datetime | None
    started_at: datetime | None
    runtime_ms: int
    cost: float
    tokens_generated: int
    tokens_input: int
    input_length_ms: int | None
    error_code: str | None
    error_message: str | None
    webhook_url: str | None
    result: dict[str, Any] | None


def _end_each_alone(
    session: Session, endings: Sequence[Ending], *, settings: Settings, batch_hook: bool
) -> list[EndedJob | None]:
    """SQLite (the embedded single-host mode) has no unnest: one ``end_job`` per ending."""
    done: list[EndedJob | None] = []
    for e in endings:
        o = e.outcome
        done.append(
            end_job(
                session,
                e.job_id,
                o.status,
                where=Job.attempts == e.attempt,
                settings=settings,
                batch_hook=False,
                **{f.name: getattr(o, f.name) for f in fields(o) if f.name != "status"},
            )
        )
    if batch_hook:
        end_batches_if_done(session, {j.batch_id for j in done if j and j.batch_id is not None})
    return done


def _record(
    session: Session,
    jobs: Sequence[tuple[Job | _Ended, JobStatus]],
    now: datetime,
    *,
    settings: Settings,
    audio_even_if_kept: bool,
    batch_hook: bool,
) -> list[EndedJob]:
    """What follows the ended rows in their transaction: their webhook events (written with
    the outcome, so neither can be lost without the other), their batches' end, and the
    after-commit work."""
    if not jobs:
        return []
    events = [
        # webhook_payload reads of a Job only what _Ended has too.
        JobEvent(job.id, job.webhook_url, webhook_payload(typing.cast(Job, job)))
        for job, _ in jobs
        if job.webhook_url is not None
    ]
    ids = add_job_events(session, events, at=now)
    delivery = dict(zip((e.job_id for e in events), ids, strict=True))
    ended = [_ended(job, status, now, delivery.get(job.id)) for job, status in jobs]
    if batch_hook:
        end_batches_if_done(session, {j.batch_id for j in ended if j.batch_id is not None})
    after_commit(session, lambda: _after_end(ended, settings, audio_even_if_kept))
    return ended


def _ended(
    job: Job | _Ended, status: JobStatus, now: datetime, delivery_id: str | None
) -> EndedJob:
    return EndedJob(
        id=job.id,
        status=status,
        queue=job.queue,
        batch_id=job.batch_id,
        attempts=job.attempts,
        enqueued_at=job.enqueued_at,
        started_at=job.started_at,
        finished_at=now,
        runtime_ms=job.runtime_ms,
        input_length_ms=job.input_length_ms,
        error_code=job.error_code,
        delivery_id=delivery_id,
    )


def _after_end(ended: Sequence[EndedJob], settings: Settings, audio_even_if_kept: bool) -> None:
    drop_ended_audio([j.id for j in ended], settings=settings, even_if_kept=audio_even_if_kept)
    for hook in list(_ended_hooks):
        try:
            hook(ended)
        except Exception:
            log.exception("a job-ended hook failed")
    for job in ended:
        # Sync callers wait on single jobs only, never on a batch's.
        if job.batch_id is None:
            publish_done(job.id, redis_url=settings.redis_url)


def drop_ended_audio(
    job_ids: Iterable[str], *, settings: Settings, even_if_kept: bool = False
) -> None:
    """Unless retention keeps audio (or ``even_if_kept``), unlink ended jobs from their
    blobs and delete the blobs no unfinished job still needs. Call after the commit that
    ended the jobs. Never raises: the jobs already ended, and the purge deletes what is left
    here."""
    ids = list(dict.fromkeys(job_ids))
    if (settings.keep_audio_days > 0 and not even_if_kept) or not ids:
        return
    try:
        names: list[str] = []
        for start in range(0, len(ids), CHUNK):
            with session_scope() as session:
                jobs = session.scalars(
                    select(Job)
                    .where(
                        Job.id.in_(ids[start : start + CHUNK]),
                        Job.status.in_([str(s) for s in TERMINAL_STATUSES]),
                        Job.audio_blob.is_not(None),
                    )
                    .with_for_update(skip_locked=True)
                ).all()
                for job in jobs:
                    assert job.audio_blob is not None
                    names.append(job.audio_blob)
                    job.audio_blob = None
        delete_unreferenced(names)
    except Exception:
        log.exception("deleting the audio of ended jobs failed; the purge will")


def delete_unreferenced(names: Collection[str]) -> list[str]:
    """Delete the blobs that no unfinished job points at (jobs may share one blob); returns
    those deleted. The caller has already unlinked its own rows, in a committed
    transaction, so two jobs of one blob ending at once cannot both see the other."""
    wanted = list(dict.fromkeys(names))
    in_use: set[str] = set()
    for start in range(0, len(wanted), CHUNK):
        with session_scope() as session:
            in_use.update(
                n
                for n in session.scalars(
                    select(Job.audio_blob).where(
                        UNFINISHED, Job.audio_blob.in_(wanted[start : start + CHUNK])
                    )
                )
                if n is not None
            )
    store = blobs.get_store()
    gone = [n for n in wanted if n not in in_use]
    for name in gone:
        store.delete(name)
    return gone
