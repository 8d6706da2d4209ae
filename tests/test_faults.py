"""Faults over real processes: workers killed, stalled, stopped; a broker that loses every
message; poison jobs and runaway jobs. Each test has a Redis of its own (a throwaway server
on a free port) and queues of its own, so the shared servers are never disturbed.

Settings are shortened only where the test is about the mechanism (a 4 s lease instead of
60 s); ``test_default_settings_recover_within_two_minutes`` checks what the defaults give.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session

from app.infra.db import utcnow
from app.infra.logging import Event
from app.infra.models import Job
from app.jobs.keys import CreatedKey
from app.jobs.options import TranscribeOptions
from app.settings import Settings
from tests.support.api import new_key, noise_wav
from tests.support.random_model import random_checkpoint
from tests.support.services import (
    Stack,
    WorkerProcess,
    quick_checkpoint,
    stack_with_own_redis,
)

pytestmark = pytest.mark.integration

# The mechanism at test speed: leases, held messages and the reaper in seconds.
FAST = {
    "WHISPERQ_JOB_LEASE_S": "4",
    "WHISPERQ_VISIBILITY_TIMEOUT_S": "4",
    "WHISPERQ_UNACKED_RESTORE_INTERVAL_S": "0.5",
    "WHISPERQ_REAPER_INTERVAL_S": "0.5",
    "WHISPERQ_REQUEUE_AFTER_S": "2",
}
# A random model decoding noise with every fallback off: a few seconds of work per window,
# long enough to be killed, stalled or stopped in the middle.
LONG = TranscribeOptions(
    compression_ratio_threshold=None, logprob_threshold=None, no_speech_threshold=None
).to_json()
NEVER = "http://127.0.0.1:9/never"  # deliveries are recorded, never delivered


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_checkpoint(tmp_path_factory.mktemp("faults") / "random.pt")


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return quick_checkpoint(tmp_path_factory.mktemp("faults") / "quick.pt")


@pytest.fixture(scope="module")
def key() -> CreatedKey:
    return new_key("faults")


@pytest.fixture
def stack(database: str, tmp_path: Path) -> Iterator[Stack]:
    with stack_with_own_redis(database, tmp_path, dict(FAST)) as s:
        yield s


def worker(stack: Stack, model: Path, tmp_path: Path, name: str, **kw: object) -> WorkerProcess:
    return WorkerProcess(
        model=model,
        log_path=tmp_path / f"{name}.log",
        env=stack.env,
        **kw,  # type: ignore[arg-type]
    )


def wait_running(stack: Stack, job_id: str, *, attempt: int, timeout: float = 60) -> None:
    stack.wait(
        [job_id], until=lambda r: r.status == "running" and r.attempts == attempt, timeout=timeout
    )


def wait_held(stack: Stack, n: int, timeout: float = 30) -> None:
    """Until workers hold n job messages and none waits in Redis."""
    import redis

    from worker.broker import broker_counts

    client = redis.Redis.from_url(stack.redis_url)
    queues = [stack.settings().queue_interactive, stack.settings().queue_bulk]
    deadline = time.monotonic() + timeout
    while True:
        counts = broker_counts(client, queues)
        if counts.held == n and not any(counts.waiting.values()):
            return
        assert time.monotonic() < deadline, f"workers hold {counts} after {timeout} s"
        time.sleep(0.05)


def test_sigkill_mid_job_reruns_once_and_strands_nothing(
    stack: Stack, key: CreatedKey, model: Path, tmp_path: Path
) -> None:
    # One engine slot, so the worker can start one job: the other messages it takes must
    # leave their jobs alone.
    stack.overrides["WHISPERQ_ENGINE_MAX_BATCH_ROWS"] = "1"
    stack.overrides["WHISPERQ_ENGINE_LANES"] = "1"
    stack.overrides["WHISPERQ_ENGINE_READY_ROWS"] = "0"
    first = worker(stack, model, tmp_path, "w1")
    second = None
    try:
        long_id = stack.enqueue(
            api_key_id=key.row.id, audio=noise_wav(60.0), options=LONG, webhook_url=NEVER
        )[0]
        short = stack.enqueue(api_key_id=key.row.id, audio=noise_wav(1.0), n=3, webhook_url=NEVER)
        wait_running(stack, long_id, attempt=1)
        # The other three messages reach the worker's free threads (checked in Redis, or
        # the assertion below would also pass with nothing delivered), and their tasks run;
        # the long job's own message was acked when it was claimed.
        wait_held(stack, 3)
        time.sleep(0.5)
        # It holds three messages and started one job: the others are still anybody's.
        assert {r.status for r in stack.jobs(short).values()} == {"queued"}
        first.kill()
        second = worker(stack, model, tmp_path, "w2")
        rows = stack.wait_ended([long_id, *short], timeout=120)
        assert {r.status for r in rows.values()} == {"succeeded"}, first.log()
        assert rows[long_id].attempts == 2
        assert [rows[j].attempts for j in short] == [1, 1, 1]
        # One result, one charge, one webhook event per job.
        assert stack.deliveries([long_id, *short]) == dict.fromkeys([long_id, *short], 1)
    finally:
        first.kill()
        if second is not None:
            second.stop()


def test_sigkill_with_a_claimed_units_message_reruns_each_of_its_jobs_once(
    stack: Stack, key: CreatedKey, model: Path, tmp_path: Path
) -> None:
    """A batch's 64 jobs travel as one units message: a worker with 16 engine rows claims all
    64 in one go and acks the message, then dies at once. Each of the 64 is run again by the
    next worker, once (the lease expiry queues it with a new message), and ends once."""
    from app.infra.queue import WAKE_UNITS

    rows_n = 16
    stack.overrides["WHISPERQ_ENGINE_MAX_BATCH_ROWS"] = str(rows_n)
    stack.overrides["WHISPERQ_ENGINE_LANES"] = "1"
    stack.overrides["WHISPERQ_ENGINE_READY_ROWS"] = "0"
    first = worker(stack, model, tmp_path, "w1")
    second = None
    try:
        ids = stack.enqueue(
            api_key_id=key.row.id,
            audio=noise_wav(20.0),
            options=LONG,
            n=WAKE_UNITS,
            bulk=True,
            webhook_url=NEVER,
        )
        stack.wait(ids, until=lambda r: r.status == "running" and r.attempts == 1, timeout=120)
        wait_held(stack, 0)  # the one message is acked: the 64 jobs are the leases' now
        first.kill()
        second = worker(stack, model, tmp_path, "w2")
        rows = stack.wait_ended(ids, timeout=300)
        assert {(r.status, r.attempts) for r in rows.values()} == {("succeeded", 2)}, second.log()
        assert stack.deliveries(ids) == dict.fromkeys(ids, 1)
        assert not second.events(Event.jobs_resent)  # the expiry sent them, not the reaper
    finally:
        first.kill()
        if second is not None:
            second.stop()


def test_duplicate_wakeups_never_rerun_a_healthy_job_longer_than_its_lease(
    stack: Stack, key: CreatedKey, model: Path, tmp_path: Path
) -> None:
    """Redelivered or duplicated messages are harmless: a live worker's lease holds (the
    heartbeat renews it) and the claim takes queued jobs only."""
    workers = [worker(stack, model, tmp_path, f"w{i}", concurrency=2) for i in (1, 2)]
    try:
        job_id = stack.enqueue(
            api_key_id=key.row.id, audio=noise_wav(60.0), options=LONG, webhook_url=NEVER
        )[0]
        wait_running(stack, job_id, attempt=1)
        queue = stack.settings().queue_interactive
        # Well past the 4 s lease, idle workers keep being woken up.
        while stack.jobs([job_id])[job_id].status == "running":
            stack.send(job_id, queue)
            time.sleep(0.5)
        row = stack.wait_ended([job_id])[job_id]
        assert (row.status, row.attempts) == ("succeeded", 1), [w.log() for w in workers]
        assert stack.deliveries([job_id]) == {job_id: 1}
        assert any(w.events(Event.not_claimable) for w in workers)
    finally:
        for w in workers:
            w.stop()


def test_a_stalled_worker_cannot_store_a_second_result(
    stack: Stack, key: CreatedKey, model: Path, tmp_path: Path
) -> None:
    """SIGSTOP (a frozen VM, a partition) past the lease: another worker re-runs the job;
    the stalled one, resumed, must not store, bill or announce its own outcome."""
    first = worker(stack, model, tmp_path, "w1")
    second = None
    try:
        job_id = stack.enqueue(
            api_key_id=key.row.id, audio=noise_wav(30.0), options=LONG, webhook_url=NEVER
        )[0]
        wait_running(stack, job_id, attempt=1)
        first.pause()
        second = worker(stack, model, tmp_path, "w2")
        done = stack.wait_ended([job_id], timeout=120)[job_id]
        assert (done.status, done.attempts) == ("succeeded", 2)
        first.resume()
        deadline = time.monotonic() + 60
        while not (first.events(Event.lease_lost) or first.events(Event.outcome_dropped)):
            assert time.monotonic() < deadline, first.log()
            time.sleep(0.2)
        row = stack.jobs([job_id])[job_id]
        assert (row.status, row.attempts, row.runtime_ms) == ("succeeded", 2, done.runtime_ms)
        assert row.finished_at == done.finished_at
        assert stack.deliveries([job_id]) == {job_id: 1}
    finally:
        first.kill()
        if second is not None:
            second.stop()


def test_guarded_finish_refuses_an_older_run(stack: Stack, key: CreatedKey) -> None:
    """The finish guard itself, on real Postgres: run 1 lost its lease, run 2 claimed and
    finished; run 1's late outcome is refused."""
    from app.jobs import claims

    settings = stack.settings().model_copy(update={"job_lease_s": 4})
    stack.enqueue(api_key_id=key.row.id, audio=noise_wav(1.0), webhook_url=NEVER, send=False)
    queues = [settings.queue_interactive]
    run1 = claims.claim_next(queues=queues, settings=settings).job
    assert run1 is not None
    with Session(stack.db()) as session, session.begin():
        session.execute(update(Job).where(Job.id == run1.id).values(lease_expires_at=utcnow()))
    assert claims.expire_leases(settings).requeued == [(run1.id, settings.queue_interactive)]
    run2 = claims.claim_next(queues=queues, settings=settings).job
    assert run2 is not None and run2.id == run1.id and run2.attempt == 2
    assert claims.finish(run2, status="succeeded", settings=settings, runtime_ms=1000).stored
    late = claims.finish(run1, status="failed", settings=settings, runtime_ms=5000)
    assert not late.stored
    row = stack.jobs([run1.id])[run1.id]
    assert (row.status, row.runtime_ms) == ("succeeded", 1000)
    assert stack.deliveries([run1.id]) == {run1.id: 1}


def test_redis_restarted_empty_with_jobs_queued_every_job_ends_once(
    stack: Stack, key: CreatedKey, quick: Path, tmp_path: Path
) -> None:
    w = worker(stack, quick, tmp_path, "w1", concurrency=1)
    try:
        ids = stack.enqueue(api_key_id=key.row.id, audio=noise_wav(1.0), n=6)
        ids += stack.enqueue(api_key_id=key.row.id, audio=noise_wav(1.0), n=6, bulk=True)
        stack.wait(ids, until=lambda r: True)
        deadline = time.monotonic() + 60
        while sum(r.status == "succeeded" for r in stack.jobs(ids).values()) < 1:
            assert time.monotonic() < deadline, w.log()
            time.sleep(0.1)
        assert stack.redis is not None
        stack.redis.restart()  # every message gone, and the worker's connection with them
        rows = stack.wait_ended(ids, timeout=120)
        assert {r.status for r in rows.values()} == {"succeeded"}, w.log()
        assert {r.attempts for r in rows.values()} == {1}
        assert w.events(Event.jobs_resent)
    finally:
        w.stop()


def test_sigterm_hands_jobs_back_at_once(
    stack: Stack, key: CreatedKey, model: Path, tmp_path: Path
) -> None:
    # The default 60 s lease: nothing here may wait for one to run out.
    stack.overrides.pop("WHISPERQ_JOB_LEASE_S")
    stack.overrides.pop("WHISPERQ_VISIBILITY_TIMEOUT_S")
    stack.overrides["WHISPERQ_WORKER_STOP_GRACE_S"] = "1"
    stack.overrides["WHISPERQ_REQUEUE_AFTER_S"] = "300"  # no re-send may be needed either
    first = worker(stack, model, tmp_path, "w1")
    second = None
    try:
        long_id = stack.enqueue(api_key_id=key.row.id, audio=noise_wav(60.0), options=LONG)[0]
        short = stack.enqueue(api_key_id=key.row.id, audio=noise_wav(1.0), n=3)
        wait_running(stack, long_id, attempt=1)
        first.terminate()
        first.proc.wait(30)
        rows = stack.jobs([long_id, *short])
        # Finished within the grace period, or handed back: queued again, the attempt not
        # counted, no lease to wait for.
        assert {(r.status, r.attempts, r.lease_expires_at) for r in rows.values()} <= {
            ("queued", 0, None),
            ("succeeded", 1, None),
        }, first.log()
        second = worker(stack, model, tmp_path, "w2")
        rows = stack.wait_ended([long_id, *short], timeout=90)
        assert {(r.status, r.attempts) for r in rows.values()} == {("succeeded", 1)}
        # The messages went back with the jobs: nothing had to be re-sent.
        assert not second.events(Event.jobs_resent)
    finally:
        first.kill()
        if second is not None:
            second.stop()


def test_poison_job_fails_after_max_attempts(
    stack: Stack, key: CreatedKey, model: Path, tmp_path: Path
) -> None:
    """A job that takes its worker down every time (here: killed whenever it runs)."""
    stack.overrides["WHISPERQ_JOB_MAX_ATTEMPTS"] = "2"
    job_id = stack.enqueue(
        api_key_id=key.row.id, audio=noise_wav(60.0), options=LONG, webhook_url=NEVER
    )[0]
    for attempt in (1, 2):
        w = worker(stack, model, tmp_path, f"w{attempt}")
        try:
            wait_running(stack, job_id, attempt=attempt, timeout=90)
        finally:
            w.kill()
    last = worker(stack, model, tmp_path, "w3")
    try:
        row = stack.wait_ended([job_id], timeout=60)[job_id]
        assert (row.status, row.error_code, row.attempts) == ("failed", "worker_lost", 2)
        assert "stopped 2 times" in (row.error_message or "")
        assert stack.deliveries([job_id]) == {job_id: 1}  # the customer hears of it once
    finally:
        last.stop()


def test_time_limit_fails_the_job_with_the_reason_as_a_failed_task(
    stack: Stack, key: CreatedKey, model: Path, tmp_path: Path
) -> None:
    stack.overrides["WHISPERQ_JOB_TIME_LIMIT_MIN_S"] = "0"
    # 180 s of audio: 0.63 s, against about 0.3 s per 30 s window on this random model, so
    # the run has windows left when the limit is noticed (the engine stops at a boundary).
    stack.overrides["WHISPERQ_JOB_TIME_LIMIT_FACTOR"] = "0.0035"
    w = worker(stack, model, tmp_path, "w1", concurrency=1)
    try:
        job_id = stack.enqueue(api_key_id=key.row.id, audio=noise_wav(180.0), options=LONG)[0]
        row = stack.wait_ended([job_id], timeout=60)[job_id]
        assert (row.status, row.error_code, row.attempts) == ("failed", "time_limit_exceeded", 1)
        assert "time limit of 1 s" in (row.error_message or "")
        assert row.cost == 0
        # Flower counts what Celery reports: a task that raised (logged once it returns).
        deadline = time.monotonic() + 30
        while "raised expected: JobFailed" not in w.log():
            assert time.monotonic() < deadline, w.log()
            time.sleep(0.2)
    finally:
        w.stop()


def test_cancel_of_a_running_job_stops_it_charged_for_what_ran(
    stack: Stack, key: CreatedKey, model: Path, tmp_path: Path
) -> None:
    w = worker(stack, model, tmp_path, "w1", concurrency=1)
    try:
        # 20 windows (about 6 s here): still running when the heartbeat reads the cancel
        job_id = stack.enqueue(api_key_id=key.row.id, audio=noise_wav(600.0), options=LONG)[0]
        wait_running(stack, job_id, attempt=1)
        # What POST /v1/jobs/{id}/cancel does to a running job (issue 15).
        with Session(stack.db()) as session, session.begin():
            session.execute(
                update(Job).where(Job.id == job_id).values(cancel_requested_at=utcnow())
            )
        row = stack.wait_ended([job_id], timeout=60)[job_id]
        assert (row.status, row.attempts) == ("canceled", 1)
        assert row.runtime_ms > 0 and row.cost > 0
    finally:
        w.stop()


def test_default_settings_recover_within_two_minutes() -> None:
    """With the defaults, a SIGKILLed worker's job is claimed again in well under 2 minutes
    (the tests above run the same mechanism with every period shortened)."""
    from worker.reaper import recovery_bound_s

    defaults = Settings(key_pepper="x" * 32)
    assert defaults.job_lease_s <= 60
    assert recovery_bound_s(defaults) <= 90, recovery_bound_s(defaults)
    # A short lease needs a heartbeat that beats several times within it.
    from worker.runtime import heartbeat_interval

    assert heartbeat_interval(defaults) * 3 <= defaults.job_lease_s
