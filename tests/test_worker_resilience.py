"""The worker process survives its broker and can run without a model: a Redis restart
while jobs run leaves the same worker serving new jobs (no supervisor restarts it), and the
null engine (``WHISPERQ_ENGINE=null``) ends jobs through the real claim and finish path.

Each test has a Redis of its own (a throwaway server on a free port, restarted in place) and
queues of its own, so the shared servers are never disturbed.
"""

from __future__ import annotations

import importlib
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.infra.logging import Event
from app.jobs.keys import CreatedKey
from app.jobs.options import TranscribeOptions
from tests.support.api import new_key, noise_wav
from tests.support.random_model import random_checkpoint
from tests.support.services import (
    RedisServer,
    Stack,
    WorkerProcess,
    quick_checkpoint,
    stack_with_own_redis,
)

pytestmark = pytest.mark.integration

FAST = {
    "WHISPERQ_JOB_LEASE_S": "4",
    "WHISPERQ_VISIBILITY_TIMEOUT_S": "4",
    "WHISPERQ_UNACKED_RESTORE_INTERVAL_S": "0.5",
    "WHISPERQ_REAPER_INTERVAL_S": "0.5",
    "WHISPERQ_REQUEUE_AFTER_S": "2",
}
# A random model decoding noise with every fallback off: seconds of work per window, so the
# jobs are still running (their messages held, unacked) when Redis goes away.
LONG = TranscribeOptions(
    compression_ratio_threshold=None, logprob_threshold=None, no_speech_threshold=None
).to_json()


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_checkpoint(tmp_path_factory.mktemp("resilience") / "random.pt")


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return quick_checkpoint(tmp_path_factory.mktemp("resilience") / "quick.pt")


@pytest.fixture(scope="module")
def key() -> CreatedKey:
    return new_key("resilience")


@pytest.fixture
def stack(database: str, tmp_path: Path) -> Iterator[Stack]:
    with stack_with_own_redis(database, tmp_path, dict(FAST)) as s:
        yield s


def _lost_connection_holding_a_message(redis: RedisServer) -> tuple[Any, Any]:
    """A consumer's broker connection as kombu leaves it when Redis dies under a worker: the
    task channel holds an unacked message (a running job, acks late) with its BRPOP in
    flight, and a second channel has an auto-delete broadcast queue (Celery's control
    channel). Then Redis goes away."""
    # kombu ships no types: as Any, typed code may call it.
    kombu: Any = importlib.import_module("kombu")
    conn = kombu.Connection(redis.url)
    tasks: Any = conn.default_channel
    kombu.Queue("jobs")(tasks).declare()
    kombu.Producer(tasks).publish({"job": 1}, routing_key="jobs")
    held = kombu.Queue("jobs")(tasks).get(no_ack=False)
    assert held is not None
    tasks.basic_consume("jobs", False, lambda _: None, "tasks")
    # The event loop's pinned connection and its pending BRPOP, as the worker's hub has them.
    tasks.client.connection = tasks.client.connection_pool.get_connection()
    tasks._brpop_start()
    control = conn.channel()
    bcast = kombu.Queue("bcast", kombu.Exchange("bcast", type="fanout"), auto_delete=True)
    bcast(control).declare()
    control.basic_consume("bcast", True, lambda _: None, "control")
    assert control.client is not None
    redis.stop()
    return conn, held


def test_a_lost_connection_whose_teardown_fails_keeps_the_consumer_and_its_acks(
    tmp_path: Path,
) -> None:
    """The mechanism of the crash, without a worker: Celery's handling of a lost connection
    raised out of the consumer (kombu 5.7.0), ours reconnects and the running job's message
    can still be acked once Redis is back."""
    from celery.worker.consumer import Consumer as CeleryConsumer

    from worker.broker import Consumer
    from worker.celery_app import celery

    redis = RedisServer(tmp_path / "redis").start()
    try:
        for cls, survives in ((CeleryConsumer, False), (Consumer, True)):
            conn, held = _lost_connection_holding_a_message(redis)
            consumer = cls.__new__(cls)  # only what the handler reads: its connection, app
            consumer.connection, consumer.app = conn, celery
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", PendingDeprecationWarning)  # Celery 6 notice
                if not survives:
                    # If this stops raising, kombu fixed its teardown: Consumer can go.
                    with pytest.raises(AttributeError, match="hostname"):
                        consumer.on_connection_error_after_connected(ConnectionError("lost"))
                    redis.start()
                    continue
                consumer.on_connection_error_after_connected(ConnectionError("lost"))
            assert consumer.connection is None
            redis.start()
            held.ack()  # the job that ran through the outage ends as usual
            assert held.acknowledged
    finally:
        redis.stop()


def test_redis_restart_while_jobs_run_leaves_the_same_worker_serving(
    stack: Stack, key: CreatedKey, model: Path, tmp_path: Path
) -> None:
    w = WorkerProcess(model=model, log_path=tmp_path / "w1.log", env=stack.env, concurrency=3)
    try:
        running = stack.enqueue(api_key_id=key.row.id, audio=noise_wav(10.0), options=LONG, n=2)
        stack.wait(running, until=lambda r: r.status == "running", timeout=90)
        assert stack.redis is not None
        # Down long enough for the worker to tear its connection down while nothing answers
        # (that is when kombu's teardown failed), then back on the same port, empty.
        stack.redis.stop()
        time.sleep(3)
        stack.redis.start()
        rows = stack.wait_ended(running, timeout=180)
        assert {r.status for r in rows.values()} == {"succeeded"}, w.log()
        # New work after the restart: the same process serves it, nobody restarted it.
        after = stack.enqueue(api_key_id=key.row.id, audio=noise_wav(1.0), n=2)
        rows = stack.wait_ended(after, timeout=120)
        assert {r.status for r in rows.values()} == {"succeeded"}, w.log()
        assert w.proc.poll() is None, w.log()
        assert "Unrecoverable error" not in w.log()
    finally:
        w.stop()


def test_null_engine_ends_jobs_through_the_real_queue_path_without_a_model(
    stack: Stack, key: CreatedKey, tmp_path: Path
) -> None:
    stack.overrides["WHISPERQ_ENGINE"] = "null"
    # No model anywhere: a null worker that tried to load one would fail to start.
    missing = tmp_path / "no-such-model.pt"
    w = WorkerProcess(model=missing, log_path=tmp_path / "null.log", env=stack.env)
    try:
        assert w.wait_event(Event.engine_ready)["engine"] == "null"
        ids = stack.enqueue(api_key_id=key.row.id, audio=noise_wav(1.0), n=20, webhook_url=None)
        ids += stack.enqueue(api_key_id=key.row.id, audio=noise_wav(1.0), n=5, bulk=True)
        rows = stack.wait_ended(ids, timeout=120)
        assert {r.status for r in rows.values()} == {"succeeded"}, w.log()
        assert {r.attempts for r in rows.values()} == {1}
        for r in rows.values():
            assert r.result is not None and r.result["text"] == "", r.result
            assert r.result["segments"] == []
            assert (r.runtime_ms, r.tokens_generated, r.tokens_input) == (0, 0, 0)
        assert [e["engine"] for e in w.events(Event.engine_ready)] == ["null"]  # no model
        assert w.proc.poll() is None, w.log()
    finally:
        w.stop()


def test_the_worker_command_exits_with_the_workers_status(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker that stopped on an unrecoverable error must not exit 0: that is what tells a
    restart policy (compose, systemd) to bring it back."""
    import argparse

    import app.infra.logging
    from app import stack
    from worker import runtime
    from worker.celery_app import celery
    from worker.null_engine import NullEngine

    started: list[list[str]] = []

    def start(argv: list[str]) -> int:
        started.append(argv)
        return 1  # what Celery's worker command exits with after "Unrecoverable error"

    monkeypatch.setattr(app.infra.logging, "configure_logging", lambda _settings: None)
    monkeypatch.setattr(runtime, "_engine", NullEngine())
    monkeypatch.setattr(celery, "start", start)
    assert stack.cmd_worker(argparse.Namespace(concurrency=0, queues="")) == 1
    assert started and started[0][0] == "worker"
