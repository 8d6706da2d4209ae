"""How a job ends: the one terminal transition, and the end of its audio.

``end_jobs`` is the only code that makes a job succeeded, failed or canceled, whoever ends
it (the worker's finish, lease expiry, a cancel, a batch cancel, a broker that was down, a
batch input that was never audio). In the caller's transaction it sets the status, the
finish time and the metering, writes the job's webhook event (app/jobs/outbox.py) and ends
the job's batch if this was its last job (app/jobs/batch_state.py). After the commit it
deletes the audio (``keep_audio_days`` 0), runs the hooks registered with ``on_job_ended``
(the worker's metrics), wakes the API's sync waiters and sends the events.

Hooks are registered, never patched in: whoever imports whatever, every end runs them.

Audio is deleted after the commit, never before: a row must not point at a blob that is
gone if the transaction rolls back. A crash between the commit and the delete leaves a
finished job with audio, or a blob no row names; the retention purge (app/jobs/retention.py)
catches both.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, null, select, text, update
from sqlalchemy.orm import Session, defer
from sqlalchemy.orm.attributes import set_committed_value

from app.infra import blobs
from app.infra.db import session_scope, utcnow
from app.infra.models import TERMINAL_STATUSES, Job, JobStatus
from app.infra.notify import publish_done
from app.jobs.batch_state import end_batches_if_done
from app.jobs.outbox import add_event, after_commit
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
    if status not in TERMINAL_STATUSES:
        raise ValueError(f"{status!r} does not end a job")
    now = utcnow()
    optional: dict[str, Any] = {}
    if input_length_ms is not None:
        optional["input_length_ms"] = input_length_ms
    if cancel_requested_at is not None:
        optional["cancel_requested_at"] = cancel_requested_at
    # The one assignment of a terminal status in the code base (tests/test_lifecycle.py).
    ending = (
        update(Job)
        .where(UNFINISHED, where)
        .values(
            status=status,
            finished_at=now,
            lease_expires_at=None,
            # SQL NULL, not JSON null: retention asks ``result IS NOT NULL``.
            result=null() if result is None else result,
            runtime_ms=runtime_ms,
            cost=round(runtime_ms / 1000 * settings.price_per_second, 10),
            tokens_generated=tokens_generated,
            tokens_input=tokens_input,
            error_code=error_code,
            error_message=error_message,
            **optional,
        )
    )
    jobs = session.scalars(
        # The ended rows come back (their events need them) and refresh any copy of them
        # the session holds; rows the guard left alone did not change. Not the transcript:
        # it was just sent, and may be megabytes.
        ending.returning(Job).options(defer(Job.result)),
        execution_options={"populate_existing": True, "synchronize_session": False},
    ).all()
    if not jobs:
        return []
    ended = []
    for job in jobs:
        set_committed_value(job, "result", result)
        delivery_id = None
        if job.webhook_url is not None:
            # Written with the outcome, so neither can be lost without the other.
            delivery_id = add_event(
                session, url=job.webhook_url, payload=webhook_payload(job), at=now, job_id=job.id
            )
        ended.append(_ended(job, status, now, delivery_id))
    if batch_hook:
        end_batches_if_done(session, {j.batch_id for j in jobs if j.batch_id is not None})
    after_commit(session, lambda: _after_end(ended, settings, audio_even_if_kept))
    return ended


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


def _ended(job: Job, status: JobStatus, now: datetime, delivery_id: str | None) -> EndedJob:
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
