"""With ``keep_audio_days`` 0, audio goes when its job ends, whichever way it ends, and an
upload refused before it became a job goes before the response; the purge catches what a
crash left (an ended job's audio, a blob no job names). No worker process: the worker's
finish and the reaper's lease expiry run here, as the worker runs them."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from app.infra import blobs
from app.infra.db import session_scope, utcnow
from app.infra.models import Batch, IdempotencyKey, Job, JobStatus, new_job_id
from app.infra.queue import SendError
from app.jobs import claims
from app.jobs.keys import CreatedKey
from app.jobs.options import TranscribeOptions
from app.jobs.retention import ORPHAN_AGE, purge, purge_orphans
from app.settings import Settings, get_settings
from tests.support.api import INFER, auth, new_key, noise_wav, settings_override
from tests.support.seaweed import SeaweedS3

pytestmark = pytest.mark.integration

HOOK = "http://127.0.0.1:9/never"  # makes a submission async; never called here


@pytest.fixture(scope="module")
def key() -> CreatedKey:
    return new_key("audio-retention")


@pytest.fixture
def keep0() -> Iterator[Settings]:
    with settings_override(keep_audio_days=0.0, job_max_attempts=1) as settings:
        yield settings


def stored() -> set[str]:
    return {name for name, _ in blobs.get_store().iter_stored()}


def audio_of(job_id: str) -> str | None:
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job.audio_blob


def queued_jobs(key: CreatedKey, settings: Settings, *, n: int = 1) -> tuple[str, list[str]]:
    """Rows as the API makes them, ``n`` of them sharing one blob (as tests' Stack does)."""
    blob = new_job_id()
    blobs.write_blob(blob, noise_wav(0.3, seed=n))
    ids = []
    with session_scope() as session:
        for _ in range(n):
            job = Job(
                id=new_job_id(),
                api_key_id=key.row.id,
                status=JobStatus.queued,
                queue=settings.queue_interactive,
                options=TranscribeOptions().to_json(),
                audio_blob=blob,
                enqueued_at=utcnow(),
            )
            session.add(job)
            ids.append(job.id)
    return blob, ids


def submit(api: TestClient, key: CreatedKey, *, seed: int = 0, **headers: str) -> Any:
    return api.post(
        INFER,
        headers={**auth(key), **headers},
        files={"audio": ("a.wav", noise_wav(0.4, seed=seed))},
        data={"webhook": HOOK},
    )


# --- every way a job ends ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (JobStatus.succeeded, {"result": {"text": "", "segments": [], "language": "en"}}),
        (JobStatus.failed, {"error_code": "invalid_audio", "error_message": "not audio"}),
        (JobStatus.canceled, {"error_code": "canceled", "runtime_ms": 500}),  # while running
    ],
)
def test_the_workers_finish_deletes_the_audio(
    key: CreatedKey, keep0: Settings, status: JobStatus, outcome: dict[str, Any]
) -> None:
    blob, (job_id,) = queued_jobs(key, keep0)
    claimed = claims.claim(job_id, settings=keep0)
    assert claimed is not None
    assert claims.finish(claimed, status=status, settings=keep0, **outcome).stored
    assert audio_of(job_id) is None
    assert blob not in stored()


def test_a_shared_blob_goes_with_the_last_job_that_needs_it(
    key: CreatedKey, keep0: Settings
) -> None:
    blob, (first, second) = queued_jobs(key, keep0, n=2)
    for job_id, left in ((first, True), (second, False)):
        claimed = claims.claim(job_id, settings=keep0)
        assert claimed is not None
        claims.finish(claimed, status=JobStatus.succeeded, settings=keep0, result={"text": ""})
        assert audio_of(job_id) is None
        assert (blob in stored()) is left  # the second job still needed it


def test_canceling_a_queued_job_deletes_its_audio(
    api: TestClient, key: CreatedKey, keep0: Settings
) -> None:
    r = submit(api, key, seed=1)
    assert r.status_code == 202, r.text
    job_id = r.json()["request_id"]
    blob = audio_of(job_id)
    assert blob is not None and blob in stored()
    c = api.post(f"/v1/jobs/{job_id}/cancel", headers=auth(key))
    assert c.status_code == 200 and c.json()["status"] == "canceled", c.text
    assert audio_of(job_id) is None
    assert blob not in stored()


def test_canceling_a_batch_deletes_its_queued_jobs_audio(
    api: TestClient, key: CreatedKey, keep0: Settings
) -> None:
    files = [("file", (f"{i}.wav", noise_wav(0.3, seed=10 + i), "audio/wav")) for i in range(2)]
    r = api.post("/v1/batches", headers=auth(key), files=files)
    assert r.status_code == 201, r.text
    batch_id = r.json()["batch"]["id"]
    ids = [i["job_id"] for i in r.json()["inputs"]]
    names = {audio_of(job_id) for job_id in ids}
    assert None not in names and names <= stored()
    c = api.post(f"/v1/batches/{batch_id}/cancel", headers=auth(key))
    assert c.status_code == 200 and c.json()["canceled_jobs"] == 2, c.text
    assert [audio_of(job_id) for job_id in ids] == [None, None]
    assert not names & stored()


def test_a_batch_input_that_is_not_audio_ends_failed_with_no_blob(
    api: TestClient, key: CreatedKey, keep0: Settings
) -> None:
    before = stored()
    files = [
        ("file", ("bad.wav", b"not audio at all", "audio/wav")),
        ("file", ("good.wav", noise_wav(0.3, seed=30), "audio/wav")),
    ]
    r = api.post("/v1/batches", headers=auth(key), files=files)
    assert r.status_code == 201, r.text
    bad, good = (i["job_id"] for i in r.json()["inputs"])
    with session_scope() as session:
        job = session.get(Job, bad)
        assert job is not None
        assert (job.status, job.audio_blob, job.finished_at is not None) == ("failed", None, True)
        assert job.error_code is not None
    # Only the good input's upload is kept: the bad one was never stored.
    assert stored() - before == {audio_of(good)}


@pytest.mark.parametrize("canceled", [False, True], ids=["worker_lost", "canceled_while_dead"])
def test_lease_expiry_that_ends_a_job_deletes_its_audio(
    key: CreatedKey, keep0: Settings, canceled: bool
) -> None:
    blob, (job_id,) = queued_jobs(key, keep0)
    assert claims.claim(job_id, settings=keep0) is not None
    with session_scope() as session:  # its worker died: the lease ran out
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(
                lease_expires_at=utcnow() - timedelta(seconds=5),
                cancel_requested_at=utcnow() if canceled else None,
            )
        )
    expired = claims.expire_leases(keep0)
    assert [j for j, _ in expired.failed] == [job_id]
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        assert (job.status, job.error_code) == (
            ("canceled", "canceled") if canceled else ("failed", claims.WORKER_LOST)
        )
        assert job.audio_blob is None
    assert blob not in stored()


def test_a_job_the_broker_never_got_deletes_its_audio(
    api: TestClient, key: CreatedKey, keep0: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    import app.jobs.submission

    def broker_down(job_ids: list[str], *, queue: str) -> None:
        raise SendError(0, ConnectionError("Error 111 connecting to redis"))

    monkeypatch.setattr(app.jobs.submission, "send_jobs", broker_down)
    before = stored()
    r = submit(api, key, seed=2)
    assert r.status_code == 503 and r.json()["error"]["code"] == "queue_unavailable", r.text
    with session_scope() as session:
        job = session.get(Job, r.json()["request_id"])
        assert job is not None and job.status == "failed"
        assert job.audio_blob is None
    assert stored() == before


def test_a_batch_job_the_broker_never_got_takes_the_resent_upload(
    api: TestClient, key: CreatedKey, keep0: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its audio went with the 503; the client's resend (same keys, same files) becomes its
    audio instead of being dropped as a duplicate, so the job can run."""
    import app.jobs.submission

    def broker_down(job_ids: list[str], *, queue: str) -> None:
        raise SendError(0, ConnectionError("Error 111 connecting to redis"))

    wav = noise_wav(0.3, seed=20)
    parts = [
        ("manifest", ("m.jsonl", b'{"file": "a.wav", "idempotency_key": "a"}\n', "text/plain")),
        ("file", ("a.wav", wav, "audio/wav")),
    ]
    monkeypatch.setattr(app.jobs.submission, "send_jobs", broker_down)
    r = api.post("/v1/batches", headers={**auth(key), "Idempotency-Key": "ret"}, files=parts)
    assert r.status_code == 503, r.text
    with session_scope() as session:
        batch_id = session.scalar(select(Batch.id).where(Batch.idempotency_key == "ret"))
        job = session.scalars(select(Job).where(Job.batch_id == batch_id)).one()
        assert (job.status, job.audio_blob) == ("failed", None)
    monkeypatch.undo()  # the broker is back
    again = api.post(f"/v1/batches/{batch_id}/files", headers=auth(key), files=parts)
    assert again.status_code == 200 and again.json()["duplicates"] == 1, again.text
    blob = audio_of(job.id)
    assert blob is not None and blob in stored()


# --- uploads that never become a job ----------------------------------------------------


def test_an_upload_refused_for_a_reused_idempotency_key_is_deleted(
    api: TestClient, key: CreatedKey, keep0: Settings
) -> None:
    first = submit(api, key, seed=3, **{"Idempotency-Key": "reused"})
    assert first.status_code == 202, first.text
    before = stored()
    r = submit(api, key, seed=4, **{"Idempotency-Key": "reused"})  # other audio, same key
    assert r.status_code == 409 and r.json()["error"]["code"] == "idempotency_key_reused"
    assert stored() == before


def test_an_upload_refused_for_an_invalid_idempotency_key_is_deleted(
    api: TestClient, key: CreatedKey, keep0: Settings
) -> None:
    before = stored()
    r = submit(api, key, seed=5, **{"Idempotency-Key": "has space"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_idempotency_key"
    assert stored() == before


def test_an_upload_the_openai_route_refuses_is_deleted(
    api: TestClient, key: CreatedKey, keep0: Settings
) -> None:
    before = stored()
    r = api.post(
        "/v1/audio/transcriptions",
        headers={**auth(key), "Idempotency-Key": "x" * 300},
        files={"file": ("a.wav", noise_wav(0.4, seed=6))},
        data={"model": "whisper-1"},
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_idempotency_key"
    assert stored() == before


def test_an_upload_the_openai_route_refuses_for_a_reused_key_is_deleted(
    api: TestClient, key: CreatedKey, keep0: Settings
) -> None:
    """A 409 with the file already streamed in (the key is read after the upload)."""
    with session_scope() as session:  # the key already stands for another request
        now = utcnow()
        session.add(
            IdempotencyKey(
                api_key_id=key.row.id,
                key="openai-reused",
                fingerprint="another request",
                created_at=now,
                expires_at=now + timedelta(hours=1),
            )
        )
    before = stored()
    r = api.post(
        "/v1/audio/transcriptions",
        headers={**auth(key), "Idempotency-Key": "openai-reused"},
        files={"file": ("a.wav", noise_wav(0.4, seed=7))},
        data={"model": "whisper-1"},
    )
    assert r.status_code == 409 and r.json()["error"]["code"] == "idempotency_key_reused"
    assert stored() == before


def test_an_upload_whose_submission_fails_is_deleted(
    api: TestClient, key: CreatedKey, keep0: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not a refusal but a failure (Postgres gone while the key is reserved): no job names
    the upload, so it goes before the error answers."""
    from sqlalchemy.exc import OperationalError

    from app.jobs import idempotency

    def db_down(*_args: Any) -> None:
        raise OperationalError("SELECT", {}, Exception("connection refused"))

    monkeypatch.setattr(idempotency, "_reserve", db_down)
    before = stored()
    r = submit(api, key, seed=8, **{"Idempotency-Key": "db-down"})
    assert r.status_code == 503, r.text
    assert stored() == before


# --- the purge --------------------------------------------------------------------------


def test_the_purge_deletes_old_orphans_and_keeps_fresh_and_named_blobs(
    key: CreatedKey, keep0: Settings
) -> None:
    named, _ = queued_jobs(key, keep0)  # old, but a queued job still needs it
    blobs.write_blob(old := new_job_id(), b"left by a crash")
    blobs.write_blob(fresh := new_job_id(), b"its job is being committed")
    long_ago = time.time() - ORPHAN_AGE.total_seconds() - 3600
    for name in (named, old):
        os.utime(get_settings().blob_dir / name, (long_ago, long_ago))

    report = purge(keep0, now=utcnow(), dry_run=True)
    assert report.orphans_deleted == 1 and old in stored()  # a dry run deletes nothing
    assert purge(keep0, now=utcnow()).orphans_deleted == 1
    assert old not in stored()
    assert {named, fresh} <= stored()


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_both_stores_list_their_blobs_for_the_orphan_purge(
    key: CreatedKey,
    keep0: Settings,
    backend: str,
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    store: blobs.BlobStore
    server = None
    if backend == "local":
        store = blobs.LocalBlobStore(tmp_path / "blobs")
    else:
        server = SeaweedS3(tmp_path_factory.mktemp("seaweed")).start()
        bucket = server.create_bucket("orphans")
        store = blobs.S3BlobStore(server.client(), bucket=bucket, prefix="audio/")
    try:
        src = tmp_path / "src.bin"
        src.write_bytes(b"audio")
        named, _ = queued_jobs(key, keep0)
        orphan = new_job_id()
        for name in (named, orphan):
            store.put_file(name, src)
        listed = dict(store.iter_stored())
        assert set(listed) == {named, orphan}
        assert all(abs((t - utcnow()).total_seconds()) < 600 for t in listed.values())
        # Past the orphan age both are old; only the one no job names goes.
        later = utcnow() + ORPHAN_AGE + timedelta(hours=1)
        assert purge_orphans(store, now=later) == 1
        assert {n for n, _ in store.iter_stored()} == {named}
    finally:
        if server is not None:
            server.stop()


def test_the_worker_runs_the_purge_even_when_nothing_is_kept(
    keep0: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker import observability

    assert keep0.keep_audio_days == 0 and keep0.retention_days == 0
    ran = threading.Event()
    monkeypatch.setattr(observability, "get_settings", lambda: keep0)
    monkeypatch.setattr(observability, "_purge_loop", lambda settings: ran.set())
    observability._on_ready()
    assert ran.wait(10)
