"""Job management over the real stack: listing with filters and keyset pagination under
concurrent inserts, cancel (a queued job never reaches the engine), delete (audio,
transcript and webhook bodies gone, billing kept) and Idempotency-Key on submissions.

Tests that need no worker run first; the module's worker (a small random checkpoint) starts
with the first test that asks for it.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from app.api.schemas import JobPage, JobView
from app.infra.db import session_scope, utcnow
from app.infra.logging import Event
from app.infra.models import IdempotencyKey, Job, JobStatus, WebhookDelivery
from app.jobs import claims as worker_jobs
from app.jobs.keys import CreatedKey
from app.settings import get_settings
from tests.support.api import INFER, auth, new_key, noise_wav, wait_job
from tests.support.iface import queued_job
from tests.support.random_model import random_checkpoint
from tests.support.services import Receiver, WorkerProcess

pytestmark = pytest.mark.integration


def walk(
    api: TestClient,
    key: CreatedKey,
    *,
    limit: int,
    between: Callable[[int], None] = lambda _: None,
    **params: Any,
) -> list[str]:
    ids: list[str] = []
    cursor = None
    for page_no in range(1000):
        query = {"limit": limit, **params, **({"cursor": cursor} if cursor else {})}
        r = api.get("/v1/jobs", params=query, headers=auth(key))
        assert r.status_code == 200, r.text
        page = JobPage.model_validate(r.json())
        assert len(page.data) <= limit
        ids += [j.request_id for j in page.data]
        between(page_no)
        if not page.has_more:
            assert page.next_cursor is None
            return ids
        cursor = page.next_cursor
    raise AssertionError("pagination never ended")


def created_at(job_id: str) -> Any:
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job.created_at


def cancel_all(api: TestClient, key: CreatedKey, ids: list[str]) -> None:
    """So no later worker (this module's or another's) runs the jobs left queued here."""
    for job_id in ids:
        api.post(f"/v1/jobs/{job_id}/cancel", headers=auth(key))


def test_pagination_returns_every_job_exactly_once_while_jobs_are_inserted(
    api: TestClient,
) -> None:
    key = new_key("pages")
    existing = [queued_job(key, seed=i) for i in range(14)]
    # Several rows with one created_at (a coarse clock, several API replicas): only the id
    # orders them, and the group straddles page boundaries.
    same = utcnow() - timedelta(minutes=5)
    with session_scope() as session:
        session.execute(update(Job).where(Job.id.in_(existing[3:10])).values(created_at=same))
    inserted: list[str] = []

    def insert_during_walk(page_no: int) -> None:
        inserted.append(queued_job(key, seed=100 + page_no))
        # An insert from a replica whose clock is behind lands inside the walked range.
        late = queued_job(key, seed=200 + page_no)
        with session_scope() as session:
            session.execute(update(Job).where(Job.id == late).values(created_at=same))
        inserted.append(late)

    walked = walk(api, key, limit=3, between=insert_during_walk)
    try:
        assert len(walked) == len(set(walked)), "a job came twice"
        assert set(existing) <= set(walked), f"skipped: {set(existing) - set(walked)}"
        assert set(walked) <= set(existing) | set(inserted)
        order = [(created_at(j), j) for j in walked]
        assert order == sorted(order, reverse=True), "not newest first"
        # A walk without inserts sees everything, once.
        everything = walk(api, key, limit=4)
        assert sorted(everything) == sorted(existing + inserted)
    finally:
        cancel_all(api, key, existing + inserted)


def test_filters_and_tenancy(api: TestClient) -> None:
    key, other = new_key("filters"), new_key("filters-other")
    ids = [queued_job(key, seed=i) for i in range(5)]
    try:
        for job_id in ids[:2]:
            assert api.post(f"/v1/jobs/{job_id}/cancel", headers=auth(key)).status_code == 200
        assert sorted(walk(api, key, limit=10, status="canceled")) == sorted(ids[:2])
        assert sorted(walk(api, key, limit=10, status="queued")) == sorted(ids[2:])
        both = walk(api, key, limit=2, status=["queued", "canceled"])
        assert sorted(both) == sorted(ids)
        pivot = created_at(ids[2]).isoformat()
        assert sorted(walk(api, key, limit=10, created_after=pivot)) == sorted(ids[2:])
        assert sorted(walk(api, key, limit=10, created_before=pivot)) == sorted(ids[:2])
        assert walk(api, other, limit=10) == []  # another tenant's jobs are never listed
        for bad in (
            {"cursor": "bm90LWEtY3Vyc29y"},
            {"status": "done"},
            {"limit": 0},
            {"created_after": "0001-01-01T00:00:00+01:00"},  # no UTC equivalent
        ):
            r = api.get("/v1/jobs", params=bad, headers=auth(key))
            assert r.status_code == 422, r.text
            assert r.json()["error"]["code"] in ("invalid_cursor", "invalid_request")
        assert api.get("/v1/jobs", headers={"Authorization": "bearer x.y"}).status_code == 401
    finally:
        cancel_all(api, key, ids)


def test_cancel_is_guarded_against_a_worker_claiming_the_job(api: TestClient) -> None:
    key = new_key("cancel")
    settings = get_settings()
    queued = queued_job(key)
    r = api.post(f"/v1/jobs/{queued}/cancel", headers=auth(key))
    assert r.status_code == 200
    view = JobView.model_validate(r.json())
    assert view.status == "canceled" and view.finished_at and view.cancel_requested_at
    assert api.post(f"/v1/jobs/{queued}/cancel", headers=auth(key)).status_code == 200
    assert worker_jobs.claim(queued, settings=settings) is None  # a worker cannot take it

    # A worker claims this one first: cancel must not flip a running job to canceled.
    running = queued_job(key)
    claimed = worker_jobs.claim(running, settings=settings)
    assert claimed is not None
    r = api.post(f"/v1/jobs/{running}/cancel", headers=auth(key))
    assert r.status_code == 202, r.text
    assert r.json()["status"] == "running" and r.json()["cancel_requested_at"]
    worker_jobs.finish(
        claimed,
        status=JobStatus.succeeded,
        settings=settings,
        result={"text": "", "segments": [], "language": "en"},
        runtime_ms=10,
    )
    r = api.post(f"/v1/jobs/{running}/cancel", headers=auth(key))
    assert r.status_code == 409 and r.json()["error"]["code"] == "job_already_finished"
    assert api.get(f"/v1/jobs/{running}", headers=auth(key)).json()["status"] == "succeeded"
    # The race itself: the API read the row as queued, then a worker claimed it before the
    # API's UPDATE. The guarded UPDATE must match nothing and leave the job running.
    from app.api.jobs import _cancel_queued
    from app.infra.db import get_sessionmaker

    racing = queued_job(key)
    with get_sessionmaker()() as session:
        stale = session.get(Job, racing)
        assert stale is not None and stale.status == "queued"
        assert worker_jobs.claim(racing, settings=settings) is not None
        assert _cancel_queued(session, stale, settings) is False
        session.refresh(stale)
        assert stale.status == "running" and stale.finished_at is None
    # Deleting a running job is refused; another tenant gets a 404 for all of it.
    third = queued_job(key)
    assert worker_jobs.claim(third, settings=settings) is not None
    r = api.delete(f"/v1/jobs/{third}", headers=auth(key))
    assert r.status_code == 409 and r.json()["error"]["code"] == "job_in_progress"
    for method, path in (("post", "/cancel"), ("delete", ""), ("get", "")):
        got = getattr(api, method)(f"/v1/jobs/{third}{path}", headers=auth(new_key("o")))
        assert got.status_code == 404


def test_canceling_a_queued_job_announces_it_to_its_webhook(
    api: TestClient, receiver: Receiver
) -> None:
    key = new_key("cancel-hook")
    r = api.post(
        INFER,
        headers=auth(key),
        files={"audio": ("a.wav", noise_wav(1.0))},
        data={"webhook": receiver.url + "/hook"},
    )
    job_id = r.json()["request_id"]
    assert api.post(f"/v1/jobs/{job_id}/cancel", headers=auth(key)).status_code == 200
    (delivery,) = api.get(f"/v1/jobs/{job_id}/deliveries", headers=auth(key)).json()["deliveries"]
    assert delivery["url"] == receiver.url + "/hook"
    with session_scope() as session:
        body = session.scalars(
            select(WebhookDelivery.body).where(WebhookDelivery.job_id == job_id)
        ).one()
    payload = json.loads(body)
    assert payload["request_id"] == job_id
    assert payload["inference_status"]["status"] == "canceled" and payload["results"] is None


def test_idempotency_key(api: TestClient, receiver: Receiver) -> None:
    key = new_key("idem")
    wav, other_wav = noise_wav(1.0, seed=1), noise_wav(1.0, seed=2)
    hook = {"webhook": receiver.url + "/hook"}
    made: list[str] = []

    def post(idem: str, audio: bytes = wav, **fields: str) -> Any:
        return api.post(
            INFER,
            headers={**auth(key), "Idempotency-Key": idem},
            files={"audio": ("a.wav", audio)},
            data={**hook, **fields},
        )

    try:
        first = post("k-1")
        assert first.status_code == 202 and "idempotent-replayed" not in first.headers
        made.append(first.json()["request_id"])
        again = post("k-1")
        assert again.status_code == 202 and again.headers["idempotent-replayed"] == "true"
        assert again.json()["request_id"] == first.json()["request_id"]
        for changed in (post("k-1", other_wav), post("k-1", temperature="0.5")):
            assert changed.status_code == 409, changed.text
            assert changed.json()["error"]["code"] == "idempotency_key_reused"
        # Keys are per API key: another tenant's same key is its own.
        theirs = api.post(
            INFER,
            headers={**auth(new_key("idem-2")), "Idempotency-Key": "k-1"},
            files={"audio": ("a.wav", wav)},
            data=hook,
        )
        assert theirs.status_code == 202 and theirs.json()["request_id"] not in made
        made.append(theirs.json()["request_id"])
        # A refused request releases its key, so the corrected request can use it.
        bad = post("k-2", b"\x00not audio" * 100)
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_audio"
        fixed = post("k-2")
        assert fixed.status_code == 202 and "idempotent-replayed" not in fixed.headers
        made.append(fixed.json()["request_id"])
        # After 24 h the key is forgotten: the same key makes a new job.
        with session_scope() as session:
            session.execute(
                update(IdempotencyKey)
                .where(IdempotencyKey.key == "k-1", IdempotencyKey.api_key_id == key.row.id)
                .values(expires_at=utcnow() - timedelta(seconds=1))
            )
        later = post("k-1")
        assert later.status_code == 202 and later.json()["request_id"] not in made
        made.append(later.json()["request_id"])
        assert post("x" * 256).status_code == 422
        # Concurrent requests with one key make one job.
        results: list[Any] = []
        threads = [
            threading.Thread(target=lambda: results.append(post("k-race"))) for _ in range(4)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        ok = {r.json()["request_id"] for r in results if r.status_code == 202}
        assert len(ok) == 1, [r.text for r in results]
        assert all(
            r.status_code == 202 or r.json()["error"]["code"] == "idempotency_key_in_use"
            for r in results
        )
        made += list(ok)
        with session_scope() as session:
            mine = session.scalars(select(Job.id).where(Job.api_key_id == key.row.id)).all()
        assert sorted(mine) == sorted(set(made) - {theirs.json()["request_id"]})
    finally:
        cancel_all(api, key, made)


# --- with a worker ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    tmp = tmp_path_factory.mktemp("jobs-worker")
    proc = WorkerProcess(
        model=random_checkpoint(tmp / "random.pt"),
        log_path=tmp / "worker.log",
        # Keep audio after the job ends (the default deletes it), so DELETE has some to remove.
        # A long lease puts the heartbeat (which also finds cancels) minutes apart: a running
        # job's cancel must then arrive by the API's signal.
        env={
            "WHISPERQ_KEEP_AUDIO_DAYS": "1",
            "WHISPERQ_JOB_LEASE_S": "600",
            "WHISPERQ_VISIBILITY_TIMEOUT_S": "600",
        },
    )
    yield proc
    proc.stop()


def test_a_canceled_queued_job_never_reaches_the_engine(
    api: TestClient, request: pytest.FixtureRequest
) -> None:
    key = new_key("never-runs")
    canceled = queued_job(key, seed=7)  # its message is in Redis before any worker exists
    assert api.post(f"/v1/jobs/{canceled}/cancel", headers=auth(key)).status_code == 200
    proc: WorkerProcess = request.getfixturevalue("worker")  # starts only now
    after = queued_job(key, seed=8)  # queued behind it: once it is done, so is the first
    assert wait_job(api, key, after)["status"] == "succeeded", proc.log()[-3000:]
    # The worker got its message and dropped it (tasks.run_job).
    assert canceled in {e["job_id"] for e in proc.events(Event.not_claimable)}
    with session_scope() as session:
        job = session.get(Job, canceled)
        assert job is not None
        assert (job.status, job.attempts, job.started_at, job.runtime_ms) == (
            "canceled",
            0,
            None,
            0,
        )


def test_delete_removes_audio_transcript_and_webhook_bodies_but_keeps_billing(
    api: TestClient, worker: WorkerProcess, receiver: Receiver
) -> None:
    key = new_key("delete")
    r = api.post(
        INFER,
        headers=auth(key),
        files={"audio": ("a.wav", noise_wav(2.0, seed=3))},
        data={"webhook": receiver.url + "/hook", "initial_prompt": "secret names"},
    )
    job_id = r.json()["request_id"]
    receiver.wait_for(1)
    done = wait_job(api, key, job_id)
    assert done["status"] == "succeeded", worker.log()[-3000:]
    with session_scope() as session:
        row = session.get(Job, job_id)
        assert row is not None and row.audio_blob is not None
        blob = Path(get_settings().blob_dir) / row.audio_blob
    assert blob.is_file()
    r = api.delete(f"/v1/jobs/{job_id}", headers=auth(key))
    assert r.status_code == 200, r.text
    view = JobView.model_validate(r.json())
    assert view.deleted_at and view.results is None and view.status == "succeeded"
    assert view.options["initial_prompt"] is None
    assert view.inference_status.runtime_ms == done["inference_status"]["runtime_ms"] > 0
    assert view.inference_status.cost == done["inference_status"]["cost"] > 0
    assert not blob.exists()
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.result is None and job.audio_blob is None
        bodies = session.scalars(
            select(WebhookDelivery.body).where(WebhookDelivery.job_id == job_id)
        ).all()
    assert bodies == [""]
    got = api.get(f"/v1/jobs/{job_id}/transcript.txt", headers=auth(key))
    assert got.status_code == 410 and got.json()["error"]["code"] == "job_deleted"
    assert api.delete(f"/v1/jobs/{job_id}", headers=auth(key)).status_code == 200  # idempotent
    listed = walk(api, key, limit=10)
    assert listed == [job_id]  # still listed: the billing row stays


def wait_status(api: TestClient, key: CreatedKey, job_id: str, status: str) -> None:
    import time

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if api.get(f"/v1/jobs/{job_id}", headers=auth(key)).json()["status"] == status:
            return
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never became {status}")


def test_a_running_long_job_ends_canceled_and_is_charged_for_what_ran(
    api: TestClient, worker: WorkerProcess, receiver: Receiver
) -> None:
    key = new_key("cancel-running")
    r = api.post(
        INFER,
        headers=auth(key),
        # Five minutes of audio: ten 30-second windows, so it is still running when asked.
        files={"audio": ("long.wav", noise_wav(300.0, seed=5))},
        data={"webhook": receiver.url + "/hook", "temperature_increment_on_fallback": "none"},
    )
    assert r.status_code == 202, r.text
    job_id = r.json()["request_id"]
    wait_status(api, key, job_id, "running")
    r = api.post(f"/v1/jobs/{job_id}/cancel", headers=auth(key))
    assert r.status_code in (200, 202), r.text
    done = wait_job(api, key, job_id, timeout=300)
    assert done["status"] == "canceled", (done["status"], worker.log()[-2000:])
    assert done["results"] is None
    assert done["inference_status"]["runtime_ms"] > 0  # charged for the windows that ran
    assert done["inference_status"]["cost"] > 0
