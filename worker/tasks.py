"""Celery tasks: a message is a wake-up for one claim, or for WAKE_UNITS (a bulk enqueue,
app/infra/queue.py); the task claims the next jobs by policy from Postgres, hands numerics to
the engine, and stores each outcome in a guarded transaction.

What happens to the message: it is acked once its claims have committed (or nothing was there
to claim): from then on the jobs are Postgres's, their leases repair a worker that dies, and a
job handed back at shutdown gets a wake-up of its own. It goes back to Redis
(``Reject(requeue=True)``) unclaimed when Postgres was unreachable, when the worker shuts down
first, when every key with work is at its in-flight cap, or (a units message) when the worker
has no room for it within UNITS_WAIT_S. It is never dropped unclaimed.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, NoReturn

import numpy as np
from celery.exceptions import Reject
from sqlalchemy.exc import SQLAlchemyError

from app.infra.audio_probe import AudioError
from app.infra.logging import Event
from app.infra.models import JobStatus
from app.infra.queue import (
    DELIVER_WEBHOOK,
    RUN_JOB,
    WAKE_UNITS,
    SendError,
    send_delivery,
    send_jobs,
)
from app.jobs import claims
from app.jobs.limits import job_time_limit_s
from app.settings import Settings, get_settings
from worker import broker, deliveries, reaper, runtime
from worker.audio import load_job_audio
from worker.celery_app import celery
from worker.coalesce import Coalescer
from worker.engine import EngineInputError, EngineJob, EngineResult, EngineStopped

log = logging.getLogger(__name__)

SAMPLE_RATE = 16_000
# Outcomes stored in one transaction at most (a commit per job is what it saves).
FINISH_BATCH_MAX = 256
# How often a waiting task looks at its stop reasons (cancel, limit, shutdown, lease).
POLL_S = 0.25


class JobFailed(Exception):  # noqa: N818 (it names the outcome Flower shows)
    """Raised after a failure is stored, so Flower counts the task as failed. The message is
    acked all the same (acks_late acks failures): no retry, no redelivery. One string
    argument, so Celery can pickle it into the task-failed event."""


def _store(claimed: claims.ClaimedJob, settings: Settings, **outcome: Any) -> bool:
    """Save the outcome, retrying while Postgres is away: a finished transcript is never
    thrown away because the database blinked. The heartbeat keeps the lease meanwhile."""
    delay = settings.db_retry_delay_s
    give_up = time.monotonic() + max(600.0, settings.job_lease_s * 10.0)
    while True:
        try:
            done = _finisher.submit((claimed, claims.Outcome(**outcome)))
            break
        except SQLAlchemyError as exc:
            if time.monotonic() > give_up:
                raise
            log.warning(
                "job %s: saving its outcome failed (%s); retrying",
                claimed.id,
                exc,
                extra={"event": Event.store_retry, "job_id": claimed.id},
            )
            time.sleep(delay)
            delay = min(delay * 2, 30.0)
    if not done.stored:
        log.info(
            "job %s: another run owns it now; this run's outcome is dropped",
            claimed.id,
            extra={"event": Event.outcome_dropped, "job_id": claimed.id},
        )
        return False
    # Its webhook event, the API's waiter and the audio were seen to by the end itself
    # (app/jobs/lifecycle.py), after the commit.
    return True


def _fail(claimed: claims.ClaimedJob, settings: Settings, code: str, message: str) -> str:
    if _store(claimed, settings, status=JobStatus.failed, error_code=code, error_message=message):
        # The failure is stored and says why; the exception that led here is no news.
        raise JobFailed(f"job {claimed.id} failed: {code}: {message}") from None
    return "dropped"


def _time_limit_s(audio: np.ndarray, settings: Settings) -> float:
    return job_time_limit_s(round(len(audio) * 1000 / SAMPLE_RATE), settings)


def _engine_job(
    audio: np.ndarray, claimed: claims.ClaimedJob, entry: runtime.InFlight, settings: Settings
) -> EngineJob:
    return EngineJob(
        audio=audio,
        options=claimed.options,
        # Interactive rows go first into the engine's batch too.
        priority=1 if claimed.queue == settings.queue_interactive else 0,
        stop_check=entry.stop_check,
    )


def _wait(
    future: Future[EngineResult], entry: runtime.InFlight, limit_s: float, settings: Settings
) -> EngineResult | None:
    """The engine's result, or None once the run must stop (``entry.reason`` says why)."""
    deadline = time.monotonic() + limit_s
    stop_noticed: float | None = None
    grace_end: float | None = None
    while True:
        try:
            return future.result(timeout=POLL_S)
        except FutureTimeout:
            pass
        now = time.monotonic()
        if now > deadline:
            entry.stop(runtime.STOP_TIME_LIMIT)
        if runtime.stopping.is_set():
            grace_end = grace_end or now + settings.worker_stop_grace_s
            if now >= grace_end:
                entry.stop(runtime.STOP_SHUTDOWN)
        if entry.reason is None:
            continue
        stop_noticed = stop_noticed or now
        # The engine polls stop_check and ends the run at its next window, saying what it
        # used; one that does not within the wait is let go of.
        if now - stop_noticed > runtime.ENGINE_STOP_WAIT_S:
            future.cancel()
            return None


def _result_of(out: EngineResult) -> dict[str, Any]:
    return {
        "text": out.text,
        "segments": [s.to_json() for s in out.segments],
        "language": out.language,
    }


def _run(claimed: claims.ClaimedJob, entry: runtime.InFlight, settings: Settings) -> str:
    engine = runtime.get_engine()  # run_job's announcement lasts until the submit below
    try:
        audio, input_length_ms = load_job_audio(
            blob=claimed.audio_blob, url=claimed.audio_url, settings=settings
        )
    except AudioError as exc:
        engine.withdraw()
        return _fail(claimed, settings, exc.code, exc.message)
    limit_s = _time_limit_s(audio, settings)
    started = time.monotonic()
    ran_ms: int | None = None
    try:
        future = engine.submit(_engine_job(audio, claimed, entry, settings))
        out = _wait(future, entry, limit_s, settings)
    except EngineInputError as exc:
        return _fail(claimed, settings, exc.code, exc.message)
    except EngineStopped as exc:
        entry.stop(exc.reason or runtime.STOP_SHUTDOWN)
        # The engine's share of model time; a stop before it attributed any falls back to
        # the wall time below.
        ran_ms = exc.runtime_ms or None
        out = None
    except Exception as exc:
        log.exception("job %s failed", claimed.id)
        # The detail (paths, internals) goes to the log above; the caller gets the kind only.
        return _fail(
            claimed, settings, "internal_error", f"the server failed it ({type(exc).__name__})"
        )
    if out is not None:
        _store(
            claimed,
            settings,
            status=JobStatus.succeeded,
            result=_result_of(out),
            input_length_ms=input_length_ms,
            runtime_ms=out.runtime_ms,
            tokens_generated=out.tokens_generated,
            tokens_input=out.tokens_input,
        )
        return "succeeded"
    if ran_ms is None:
        ran_ms = max(1, round((time.monotonic() - started) * 1000))
    reason = entry.reason
    if reason == runtime.STOP_CANCELED:
        # Charged for what ran, like any model time.
        _store(
            claimed,
            settings,
            status=JobStatus.canceled,
            input_length_ms=input_length_ms,
            runtime_ms=ran_ms,
            error_code="canceled",
            error_message="canceled on request while running",
        )
        return "canceled"
    if reason == runtime.STOP_TIME_LIMIT:
        return _fail(
            claimed,
            settings,
            "time_limit_exceeded",
            f"the job ran over its time limit of {limit_s:.0f} s "
            f"({settings.job_time_limit_min_s:.0f} s + {settings.job_time_limit_factor:g} x "
            "the audio length)",
        )
    if reason == runtime.STOP_LEASE_LOST:
        log.warning(
            "job %s: lease lost to another run; dropping this one",
            claimed.id,
            extra={"event": Event.lease_lost, "job_id": claimed.id},
        )
        return "lease_lost"
    # Shutdown: the job goes back to the queue at once, with a wake-up of its own (its
    # message was acked when it was claimed).
    handed = claims.hand_back(claimed)
    log.warning(
        "job %s: worker stopping, job handed back (%s)",
        claimed.id,
        handed,
        extra={"event": Event.handed_back, "job_id": claimed.id},
    )
    if handed:
        try:
            send_jobs([claimed.id], queue=claimed.queue)
        except SendError:  # Redis away too: the reaper sees the job without a message
            log.warning(
                "job %s handed back without a wake-up; the reaper will send one", claimed.id
            )
    return "handed_back"


def _claim_batch(requests: Sequence[int]) -> list[claims.ClaimBatch]:
    """Each request asks for its count of jobs; they are claimed together, by policy, and
    handed out in the order asked."""
    settings = get_settings()
    got = claims.claim_many(sum(requests), queues=runtime.job_queues(settings), settings=settings)
    answers, start = [], 0
    for n in requests:
        jobs = got.jobs[start : start + n]
        start += len(jobs)
        answers.append(claims.ClaimBatch(jobs, capped=got.capped and len(jobs) < n))
    return answers


def _finish_batch(
    outcomes: Sequence[tuple[claims.ClaimedJob, claims.Outcome]],
) -> list[claims.Finished | Exception]:
    settings = get_settings()
    try:
        return list(claims.finish_many(outcomes, settings=settings))
    except SQLAlchemyError:
        if len(outcomes) == 1:
            raise
    # One outcome the database refuses must not fail the others stored beside it: each
    # alone, its own error its own (the task retries that one).
    alone: list[claims.Finished | Exception] = []
    for outcome in outcomes:
        try:
            alone.append(claims.finish_many([outcome], settings=settings)[0])
        except SQLAlchemyError as exc:
            alone.append(exc)
    return alone


# The task threads' claims and finishes, each many to a transaction under load
# (worker/coalesce.py): as many claim requests as the engine holds jobs, finishes a little more.
_claimer = Coalescer(
    "claim", _claim_batch, max_batch=lambda: runtime.engine_slots(runtime.get_engine())
)
_finisher = Coalescer("finish", _finish_batch, max_batch=lambda: FINISH_BATCH_MAX)


def _claim(n: int, settings: Settings) -> claims.ClaimBatch:
    got = _claimer.submit(n)
    # Nothing claimable: perhaps a dead worker's job whose lease ran out before the reaper saw
    # it: expired here, it goes back to the queue with a wake-up, and this claim may take it.
    if not got.jobs and not got.capped and reaper.expire_and_dispatch(settings):
        got = _claimer.submit(n)
    return got


# A units message that finds the worker full gives itself back after this long, so an idle
# worker (blocked in BRPOP, so served first) takes it instead. Long enough that a saturated
# worker's bounces cost Redis little next to its jobs (a few commands per message per wait).
UNITS_WAIT_S = 10.0


# A JobFailed is an outcome already stored, not a crash: Celery logs it in one line without a
# traceback (a server fault logged its own above) and Flower still counts a failed task.
@celery.task(name=RUN_JOB, throws=(JobFailed,))  # type: ignore[untyped-decorator]
def run_job(job_id: str | None = None, units: int = 1) -> str:
    """A wake-up for ``units`` claims (``job_id``: the first job whose submission sent it;
    the task claims by policy, so it may run others). The message is acked once its claims
    have committed: from then on Postgres holds the jobs (their leases), and the reaper counts
    only the messages not yet claimed for (worker/reaper.py).

    A single job runs on this task's thread, so Flower shows its outcome; a units message's
    jobs run on the worker's job threads and the task ends once they are claimed, so a
    Celery thread is never tied up for 64 jobs and the next message (an interactive job)
    is taken at once."""
    settings = get_settings()
    units = max(1, min(int(units), WAKE_UNITS))  # a garbled message cannot claim the world
    info = run_job.request.delivery_info or {}
    # An interactive job is never kept waiting for room by bulk work (runtime.Capacity).
    urgent = units == 1 and info.get("routing_key") == settings.queue_interactive
    capacity = runtime.capacity()
    with contextlib.nullcontext(True) if urgent else capacity.bulk_wait(units) as may_wait:
        waited = 0.0
        while (
            taken := capacity.take(units, timeout=POLL_S if may_wait else 0, urgent=urgent)
        ) is None:
            waited += POLL_S
            if runtime.stopping.is_set() or not may_wait or (units > 1 and waited >= UNITS_WAIT_S):
                raise Reject("worker full or stopping", requeue=True)
    try:
        # From its room until its job reaches the engine (or nothing is claimed), this task
        # is a job the next window waits for, briefly (claiming, ffprobe and ffmpeg). Not
        # while it waits for room: that job cannot come before a window ends and frees one,
        # and a lane that waited for it would idle its cores (with 64 clients, 1 s a window).
        with runtime.get_engine().announcing():
            return _claim_and_run(job_id, units, settings, taken)
    finally:
        taken.give_all()


def _claim_and_run(job_id: str | None, units: int, settings: Settings, taken: runtime.Taken) -> str:
    if runtime.stopping.is_set():
        raise Reject("worker shutting down", requeue=True)
    try:
        got = _claim(units, settings)
    except SQLAlchemyError as exc:
        log.warning(
            "claim failed (%s); the message goes back to the queue",
            exc,
            extra={"event": Event.claim_failed},
        )
        _back_off(settings, taken)
    taken.give(units - len(got.jobs))
    if got.jobs:
        # What the message asked for is done; a crash from here on is the leases' to repair.
        broker.ack_running(run_job.request.id)
        if units == 1:
            return _run_one(got.jobs[0], settings, taken)
        pool = runtime.runners()
        for job in got.jobs:
            pool.submit(_run_beside, job, settings, taken.split(1))
        return f"{len(got.jobs)} jobs claimed"
    if got.capped:
        _back_off(settings, taken)
    log.info(
        "job %s is not claimable (done, canceled or running elsewhere) and nothing else waits",
        job_id,
        extra={"event": Event.not_claimable, "job_id": job_id},
    )
    return "idle"


def _back_off(settings: Settings, taken: runtime.Taken) -> NoReturn:
    # Without its room: a capped key or a database outage must not hold up other work.
    taken.give_all()
    runtime.get_engine().withdraw()  # nor the engine's next window
    time.sleep(settings.db_retry_delay_s)
    raise Reject("cannot claim now", requeue=True)


def _run_beside(job: claims.ClaimedJob, settings: Settings, taken: runtime.Taken) -> None:
    """One job of a units message, on a job thread: its outcome is stored and logged."""
    with runtime.get_engine().announcing():
        try:
            _run_one(job, settings, taken)
        except JobFailed:
            pass  # stored and logged already
        except Exception:
            log.exception("job %s failed", job.id)  # not stored: its lease repairs it


def _run_one(claimed: claims.ClaimedJob, settings: Settings, taken: runtime.Taken) -> str:
    entry = runtime.track(claimed)
    try:
        return _run(claimed, entry, settings)
    finally:
        runtime.untrack(entry)
        taken.give_all()


@celery.task(name=DELIVER_WEBHOOK)  # type: ignore[untyped-decorator]
def deliver_webhook(delivery_id: str) -> None:
    settings = get_settings()
    scheduled = deliveries.attempt(delivery_id, settings=settings)
    if scheduled.delay_s is not None and scheduled.delay_s <= settings.webhook_countdown_max_s:
        send_delivery(delivery_id, countdown=scheduled.delay_s)
