"""Workers die: a delivery cut off mid-flight, or a job mid-transcription, is taken up again
from Postgres by another worker — not lost, not stored or billed twice."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from standardwebhooks import Webhook

from app.infra.db import session_scope
from app.infra.logging import Event
from app.infra.models import Job
from app.jobs.keys import CreatedKey
from app.settings import get_settings
from tests.support.api import INFER, auth, new_key, noise_wav, wait_delivery, wait_job
from tests.support.random_model import random_checkpoint
from tests.support.services import Receiver, WorkerProcess

pytestmark = pytest.mark.integration

# Short leases so a dead worker's work is re-sent within seconds, not an hour.
CRASHY = {"WHISPERQ_JOB_LEASE_S": "4", "WHISPERQ_REQUEUE_AFTER_S": "2"}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_checkpoint(tmp_path_factory.mktemp("crash") / "random.pt")


@pytest.fixture
def key() -> CreatedKey:
    return new_key("crash")


def test_worker_killed_mid_delivery_leaves_it_to_be_retried(
    api: TestClient, key: CreatedKey, receiver: Receiver, model: Path, tmp_path: Path
) -> None:
    # The first request hangs; we kill the worker while it waits for the answer.
    receiver.respond = lambda _r, n: (200, {}, 30.0 if n == 1 else 0.0, b"ok")
    first = WorkerProcess(model=model, log_path=tmp_path / "w1.log", env=CRASHY)
    second = None
    try:
        r = api.post(
            INFER,
            headers=auth(key),
            files={"audio": ("n.wav", noise_wav(1.0))},
            data={"webhook": receiver.url + "/hook", "logprob_threshold": "none"},
        )
        job_id = r.json()["request_id"]
        receiver.wait_for(1)
        first.kill()
        second = WorkerProcess(model=model, log_path=tmp_path / "w2.log", env=CRASHY)
        got = receiver.wait_for(2, timeout=90)
        assert got[0].headers["webhook-id"] == got[1].headers["webhook-id"]
        assert Webhook(key.webhook_secret).verify(got[1].body, got[1].headers)
        delivery = wait_delivery(api, key, job_id, status="delivered")
        assert delivery["attempts"][-1]["outcome"] == "delivered"
        assert second.events(Event.deliveries_resent)
    finally:
        first.kill()
        if second is not None:
            second.stop()


def test_worker_killed_mid_job_is_rerun_once(
    api: TestClient, key: CreatedKey, model: Path, tmp_path: Path
) -> None:
    first = WorkerProcess(model=model, log_path=tmp_path / "w1.log", env=CRASHY)
    second = None
    try:
        # Two 30 s windows of a random model: seconds of work to be killed in. The lease
        # (4 s) is shorter than the job: the second worker must keep renewing it.
        r = api.post(
            INFER,
            headers=auth(key),
            files={"audio": ("n.wav", noise_wav(60.0))},
            data={
                "webhook": "http://127.0.0.1:9/never",
                "compression_ratio_threshold": "none",
                "logprob_threshold": "none",
                "no_speech_threshold": "none",
            },
        )
        job_id = r.json()["request_id"]
        deadline = time.monotonic() + 60
        while api.get(f"/v1/jobs/{job_id}", headers=auth(key)).json()["status"] != "running":
            assert time.monotonic() < deadline, first.log()
            time.sleep(0.05)
        first.kill()
        second = WorkerProcess(model=model, log_path=tmp_path / "w2.log", env=CRASHY)
        job = wait_job(api, key, job_id, timeout=120)
        assert job["status"] == "succeeded", job
        with session_scope() as session:
            row = session.get(Job, job_id)
            assert row is not None and row.attempts == 2
            assert row.runtime_ms == job["inference_status"]["runtime_ms"]
    finally:
        first.kill()
        if second is not None:
            second.stop()


def test_a_job_redis_lost_is_found_again_from_postgres(
    api: TestClient, key: CreatedKey, model: Path, tmp_path: Path
) -> None:
    """A committed job whose id never reached Redis (or was lost with it) still runs."""
    from datetime import timedelta

    from app.infra import blobs
    from app.infra.db import utcnow
    from app.jobs.options import TranscribeOptions

    worker = WorkerProcess(model=model, log_path=tmp_path / "w.log", env=CRASHY)
    try:
        with session_scope() as session:
            job = Job(
                api_key_id=key.row.id,
                status="queued",
                queue=get_settings().queue_interactive,
                options=TranscribeOptions(logprob_threshold=None).to_json(),
                enqueued_at=utcnow() - timedelta(minutes=10),
            )
            session.add(job)
            session.flush()
            blobs.write_blob(job.id, noise_wav(1.0))
            job.audio_blob = job.id
            job_id = job.id
        done = wait_job(api, key, job_id, timeout=60)
        assert done["status"] == "succeeded", done
        # No message was ever sent for it: the reaper's top-up (or any other wake-up, since
        # a wake-up claims the next job by policy) ran it, and once.
        with session_scope() as session:
            row = session.get(Job, job_id)
            assert row is not None and row.attempts == 1
    finally:
        worker.stop()
