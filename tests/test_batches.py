"""Issue 13, the batch object over the real API, Postgres and Redis (no worker here: jobs
stay queued, and a worker's finish is played by the same transaction a worker runs)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
from datetime import timedelta
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import func, select, true, update

from app.api import uploads
from app.infra.db import session_scope, utcnow
from app.infra.models import Batch, Job, JobStatus, WebhookDelivery
from app.infra.queue import SendError
from app.infra.webhook_signing import sign
from app.jobs import batches
from app.jobs.keys import CreatedKey
from app.jobs.lifecycle import end_job
from app.settings import get_settings
from tests.support.api import auth, new_key, noise_wav, settings_override
from worker import deliveries

pytestmark = pytest.mark.integration

URL = "http://127.0.0.1:9/audio.wav"  # loopback is allow-listed in tests; never fetched here


@pytest.fixture(scope="module")
def key() -> CreatedKey:
    return new_key("batches")


@pytest.fixture(scope="module")
def wav() -> bytes:
    return noise_wav(0.5, seed=1)


def manifest(*lines: dict[str, Any]) -> tuple[str, bytes, str]:
    body = "".join(json.dumps(line) + "\n" for line in lines).encode()
    return ("manifest.jsonl", body, "application/x-ndjson")


def post(
    api: TestClient,
    key: CreatedKey,
    path: str = "/v1/batches",
    *,
    files: list[tuple[str, bytes]] = (),  # type: ignore[assignment]
    lines: list[dict[str, Any]] | None = None,
    data: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> Any:
    parts: list[tuple[str, tuple[str, bytes, str]]] = []
    if lines is not None:
        parts.append(("manifest", manifest(*lines)))
    parts += [("file", (name, body, "audio/wav")) for name, body in files]
    if not parts:  # httpx sends urlencoded without a file part
        parts.append(("manifest", manifest()))
    return api.post(path, headers={**auth(key), **(headers or {})}, files=parts, data=data or {})


def jobs_of(batch_id: str) -> list[Job]:
    with session_scope() as session:
        return list(
            session.scalars(
                select(Job).where(Job.batch_id == batch_id).order_by(Job.created_at, Job.id)
            )
        )


def blob_count() -> int:
    root = get_settings().blob_dir
    return len(list(root.iterdir())) if root.exists() else 0


def bulk_queue_length() -> int:
    settings = get_settings()
    client = redis.Redis.from_url(settings.redis_url)
    try:
        return int(client.llen(settings.queue_bulk))
    finally:
        client.close()


def test_files_urls_and_manifest_become_bulk_jobs(
    api: TestClient, key: CreatedKey, wav: bytes
) -> None:
    other = noise_wav(0.7, seed=2)
    before = bulk_queue_length()
    r = post(
        api,
        key,
        files=[("a.wav", wav), ("b.wav", other)],
        lines=[
            {"file": "b.wav", "custom_id": "row-1", "options": {"temperature": 0.2}},
            {"url": URL, "custom_id": "row-2", "options": {"language": "de"}},
        ],
        data={"url": [URL + "?2"], "logprob_threshold": "none", "task": "translate"},
    )
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["created"] == 4 and body["duplicates"] == 0
    assert body["batch"]["status"] == "in_progress"  # sealed: no open=true
    assert body["batch"]["counts"]["queued"] == 4
    assert [i["custom_id"] for i in body["inputs"]] == ["row-1", "row-2", "a.wav", URL + "?2"]

    jobs = {j.custom_id: j for j in jobs_of(body["batch"]["id"])}
    settings = get_settings()
    assert {j.queue for j in jobs.values()} == {settings.queue_bulk}
    assert bulk_queue_length() - before == 4
    # Batch defaults under every input, a manifest line's options over them.
    assert jobs["row-1"].options["temperature"] == 0.2
    assert jobs["row-2"].options["language"] == "de"
    assert jobs["a.wav"].options["temperature"] == 0.0
    assert all(j.options["logprob_threshold"] is None for j in jobs.values())
    assert all(j.options["task"] == "translate" for j in jobs.values())
    # Uploads are in the blob store, hashed and probed while they streamed in.
    assert jobs["row-1"].content_sha256 == hashlib.sha256(other).hexdigest()
    assert jobs["row-1"].source_name == "b.wav"
    assert jobs["a.wav"].input_length_ms == 500
    assert (settings.blob_dir / jobs["a.wav"].id).read_bytes() == wav
    assert jobs["row-2"].audio_url == URL and jobs["row-2"].audio_blob is None


@pytest.mark.parametrize(
    ("data", "lines", "field"),
    [
        ({"temperature": "2"}, None, "temperature"),
        ({"patience": "0"}, None, "patience"),
        ({}, [{"url": URL, "options": {"temperature": "hot"}}], "manifest[1].options.temperature"),
        ({}, [{"url": URL}, {"url": URL, "options": {"beam": 5}}], "manifest[2].options.beam"),
        ({}, [{"url": URL, "colour": "red"}], "manifest[1].colour"),
        ({}, [{"file": "missing.wav"}], "manifest[1].file"),
        ({"language": "xx"}, None, "language"),
    ],
)
def test_bad_options_are_refused_like_the_single_endpoint(
    api: TestClient, key: CreatedKey, wav: bytes, data: dict[str, str], lines: Any, field: str
) -> None:
    blobs_before = blob_count()
    with session_scope() as session:
        jobs_before = session.scalar(select(func.count()).select_from(Job))
    r = post(api, key, files=[("a.wav", wav)], lines=lines, data=data)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == field
    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(Job)) == jobs_before
    assert blob_count() == blobs_before  # the streamed upload was removed again


def test_webhook_and_audio_urls_go_through_the_ssrf_guard(
    api: TestClient, key: CreatedKey, wav: bytes
) -> None:
    r = post(api, key, files=[("a.wav", wav)], data={"webhook": "http://169.254.169.254/x"})
    assert r.status_code == 422
    assert r.json()["error"]["code"] == "webhook_forbidden_address"
    r = post(api, key, data={"url": ["http://10.1.2.3/a.wav"]})
    assert r.status_code == 422
    assert r.json()["error"] == {
        "code": "audio_url_forbidden_address",
        "message": r.json()["error"]["message"],
        "field": "url[0]",
    }
    r = api.post("/v1/batches", headers=auth(key), json={"urls": ["ftp://x/a.wav"]})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_url"


def test_a_bad_file_fails_its_own_job_not_the_batch(
    api: TestClient, key: CreatedKey, wav: bytes
) -> None:
    with settings_override(max_upload_bytes=len(wav) + 10):
        r = post(
            api,
            key,
            files=[
                ("good.wav", wav),
                ("text.wav", b"this is not audio"),
                ("empty.wav", b""),
                ("big.wav", wav + b"\0" * 100),
            ],
        )
    assert r.status_code == 201, r.text
    got = {i["custom_id"]: i["status"] for i in r.json()["inputs"]}
    assert got == {
        "good.wav": "queued",
        "text.wav": "failed",
        "empty.wav": "failed",
        "big.wav": "failed",
    }
    lines = [
        json.loads(x)
        for x in api.get(
            f"/v1/batches/{r.json()['batch']['id']}/results", headers=auth(key)
        ).text.splitlines()
    ]
    errors = {line["custom_id"]: (line["error"] or {}).get("code") for line in lines}
    assert errors == {
        "good.wav": None,
        "text.wav": "invalid_audio",
        "empty.wav": "empty_audio",
        "big.wav": "audio_too_large",
    }
    names = {p.name for p in get_settings().blob_dir.iterdir()}
    failed = [line["job_id"] for line in lines if line["status"] == "failed"]
    assert not any(j in n for j in failed for n in names)  # no blob (nor .part) kept


def test_another_tenants_batch_is_a_404(api: TestClient, key: CreatedKey, wav: bytes) -> None:
    batch_id = post(api, key, files=[("a.wav", wav)]).json()["batch"]["id"]
    stranger = auth(new_key("stranger"))
    for method, path in [
        ("GET", f"/v1/batches/{batch_id}"),
        ("GET", f"/v1/batches/{batch_id}/results"),
        ("GET", f"/v1/batches/{batch_id}/inputs"),
        ("POST", f"/v1/batches/{batch_id}/cancel"),
        ("POST", f"/v1/batches/{batch_id}/seal"),
        ("POST", f"/v1/batches/{batch_id}/files"),
        ("GET", "/v1/batches/nonexistent0"),
        ("GET", "/v1/batches/..%2Fx"),
    ]:
        r = api.request(method, path, headers=stranger, json={"urls": [URL]})
        assert r.status_code == 404, (method, path, r.text)
    assert api.get("/v1/batches", headers=stranger).json()["data"] == []
    assert jobs_of(batch_id)[0].status == JobStatus.queued  # the stranger canceled nothing


def test_resent_inputs_never_make_a_second_job(
    api: TestClient, key: CreatedKey, wav: bytes
) -> None:
    create = {"open": True, "options": {"logprob_threshold": None}}
    first = api.post("/v1/batches", headers={**auth(key), "Idempotency-Key": "run-1"}, json=create)
    again = api.post("/v1/batches", headers={**auth(key), "Idempotency-Key": "run-1"}, json=create)
    assert (first.status_code, again.status_code) == (201, 200)
    batch_id = first.json()["batch"]["id"]
    assert again.json()["batch"]["id"] == batch_id
    assert first.json()["batch"]["status"] == "open"
    # Concurrent creates with one key make one batch.
    made: list[str] = []
    racers = [
        threading.Thread(
            target=lambda: made.append(
                api.post(
                    "/v1/batches", headers={**auth(key), "Idempotency-Key": "race"}, json=create
                ).json()["batch"]["id"]
            )
        )
        for _ in range(4)
    ]
    for t in racers:
        t.start()
    for t in racers:
        t.join()
    assert len(made) == 4 and len(set(made)) == 1

    chunk = {
        "files": [("0", wav), ("1", noise_wav(0.4, seed=3))],
        "lines": [
            {"file": "0", "name": "x/a.wav", "idempotency_key": "k-a"},
            {"file": "1", "name": "x/b.wav", "idempotency_key": "k-b"},
        ],
    }
    path = f"/v1/batches/{batch_id}/files"
    r1 = post(api, key, path, **chunk)  # type: ignore[arg-type]
    assert r1.status_code == 200 and r1.json()["created"] == 2
    blobs_before = blob_count()
    # The client died before it recorded the answer and sends the chunk again, twice at once.
    answers: list[Any] = []
    threads = [
        threading.Thread(target=lambda: answers.append(post(api, key, path, **chunk)))  # type: ignore[arg-type]
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert all(a.json()["duplicates"] == 2 and a.json()["created"] == 0 for a in answers)
    assert {i["job_id"] for a in answers for i in a.json()["inputs"]} == {
        i["job_id"] for i in r1.json()["inputs"]
    }
    assert len(jobs_of(batch_id)) == 2
    # Inputs added later run with the options the batch was created with.
    assert {j.options["logprob_threshold"] for j in jobs_of(batch_id)} == {None}
    assert blob_count() == blobs_before  # the resent bytes were dropped
    listed = [
        json.loads(x)
        for x in api.get(f"/v1/batches/{batch_id}/inputs", headers=auth(key)).text.splitlines()
    ]
    assert sorted(x["idempotency_key"] for x in listed) == ["k-a", "k-b"]
    assert {x["source_name"] for x in listed} == {"x/a.wav", "x/b.wav"}

    sealed = api.post(f"/v1/batches/{batch_id}/seal", headers=auth(key))
    assert sealed.status_code == 200 and sealed.json()["status"] == "in_progress"
    # Sealed: duplicates are still answered, anything new is refused.
    assert post(api, key, path, **chunk).status_code == 200  # type: ignore[arg-type]
    late = post(api, key, path, files=[("2", wav)], lines=[{"file": "2", "idempotency_key": "k-c"}])
    assert late.status_code == 409 and late.json()["error"]["code"] == "batch_sealed"


def _finish_job(session: Any, job_id: str, status: JobStatus, **outcome: Any) -> Job:
    """The worker's finish through the one transition (app/jobs/lifecycle.py), without its
    batch hook: the tests below ask whether the batch is over themselves, when they choose."""
    ended = end_job(
        session, job_id, status, where=true(), settings=get_settings(), batch_hook=False, **outcome
    )
    assert ended is not None
    job = session.get(Job, job_id, populate_existing=True)
    assert job is not None
    return job


def _make_running(batch_id: str, *, started_ago_s: float = 0.0) -> list[str]:
    started = utcnow() - timedelta(seconds=started_ago_s)
    with session_scope() as session:
        ids = list(
            session.scalars(
                update(Job)
                .where(Job.batch_id == batch_id)
                .values(status=JobStatus.running, started_at=started, attempts=1)
                .returning(Job.id)
            )
        )
    return ids


def test_batch_ends_exactly_once_when_its_last_jobs_finish_together(
    api: TestClient, key: CreatedKey, wav: bytes, receiver: Any
) -> None:
    """Each worker finishes its job in its own transaction; all of them have written their
    row (not committed) before any asks whether the batch is over: without the batch lock,
    every one of them would see the others still running and nobody would end it."""
    for _ in range(5):
        r = post(
            api,
            key,
            files=[(f"{i}.wav", wav) for i in range(4)],
            data={"webhook": receiver.url + "/batch"},
        )
        batch_id = r.json()["batch"]["id"]
        job_ids = _make_running(batch_id)
        barrier = threading.Barrier(len(job_ids))
        delivered: list[str | None] = []

        def worker_finish(
            job_id: str, barrier: threading.Barrier = barrier, delivered: list[Any] = delivered
        ) -> None:
            with session_scope() as session:
                job = _finish_job(session, job_id, JobStatus.succeeded, runtime_ms=2000)
                session.flush()
                barrier.wait()
                delivered.append(batches.on_job_finished(session, job))

        threads = [threading.Thread(target=worker_finish, args=(j,)) for j in job_ids]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len([d for d in delivered if d is not None]) == 1, delivered
        # Readers and sweeps noticing afterwards, all at once, change nothing.
        sweepers = [
            threading.Thread(target=batches.end_if_done, args=(batch_id,)) for _ in range(4)
        ]
        for t in sweepers:
            t.start()
        for t in sweepers:
            t.join()
        assert batches.end_finished_batches() == 0
        with session_scope() as session:
            rows = session.scalars(
                select(WebhookDelivery).where(WebhookDelivery.batch_id == batch_id)
            ).all()
            assert len(rows) == 1 and rows[0].job_id is None  # the batch's own event
            event = json.loads(rows[0].body)
            assert event["type"] == "batch.completed"
            assert event["counts"]["succeeded"] == 4 and event["cost"] == pytest.approx(0.004)
            assert session.get(Batch, batch_id).finished_at is not None  # type: ignore[union-attr]
        got = api.get(f"/v1/batches/{batch_id}", headers=auth(key)).json()
        assert got["status"] == "completed" and got["eta_seconds"] == 0.0


def test_cancel_stops_queued_jobs_and_asks_running_ones(
    api: TestClient, key: CreatedKey, wav: bytes
) -> None:
    r = post(
        api,
        key,
        files=[(f"{i}.wav", wav) for i in range(3)],
        data={"webhook": "http://127.0.0.1:9/hook"},
    )
    batch_id = r.json()["batch"]["id"]
    running_id = r.json()["inputs"][0]["job_id"]
    with session_scope() as session:
        session.execute(
            update(Job)
            .where(Job.id == running_id)
            .values(status=JobStatus.running, started_at=utcnow())
        )
    c = api.post(f"/v1/batches/{batch_id}/cancel", headers=auth(key))
    assert c.status_code == 200, c.text
    assert (c.json()["canceled_jobs"], c.json()["cancel_requested"]) == (2, 1)
    assert c.json()["batch"]["status"] == "canceling"
    states = {
        j.id: (j.status, j.cancel_requested_at is not None, j.error_code) for j in jobs_of(batch_id)
    }
    assert states.pop(running_id) == (JobStatus.running, True, None)
    assert set(states.values()) == {(JobStatus.canceled, False, batches.BATCH_CANCELED_CODE)}
    assert not any((get_settings().blob_dir / j).exists() for j in states)
    # Canceling again is harmless; adding is refused.
    assert (
        api.post(f"/v1/batches/{batch_id}/cancel", headers=auth(key)).json()["canceled_jobs"] == 0
    )
    add = post(api, key, f"/v1/batches/{batch_id}/files", files=[("x.wav", wav)])
    assert add.status_code == 409
    # The worker honours the request: the batch ends with that job, once.
    with session_scope() as session:
        job = _finish_job(session, running_id, JobStatus.canceled)
        assert batches.on_job_finished(session, job) is not None
    got = api.get(f"/v1/batches/{batch_id}", headers=auth(key)).json()
    assert got["status"] == "canceled" and got["counts"]["canceled"] == 3
    with session_scope() as session:
        n = session.scalar(select(func.count()).where(WebhookDelivery.batch_id == batch_id))
    assert n == 1
    done = api.post(f"/v1/batches/{batch_id}/cancel", headers=auth(key))
    assert done.status_code == 200 and done.json()["batch"]["status"] == "canceled"


def test_progress_cost_and_eta_come_from_the_jobs(
    api: TestClient, key: CreatedKey, wav: bytes
) -> None:
    r = post(
        api,
        key,
        files=[(f"{i}.wav", noise_wav(1.0 + i, seed=i)) for i in range(4)],
        data={"url": [URL]},
    )
    batch_id = r.json()["batch"]["id"]
    ids = [i["job_id"] for i in r.json()["inputs"]]
    _make_running(batch_id, started_ago_s=20.0)
    with session_scope() as session:
        _finish_job(
            session,
            ids[0],
            JobStatus.succeeded,
            runtime_ms=500,
            result={
                "text": "hello",
                "segments": [{"id": 0, "text": "hello", "start": 0.0, "end": 1.0}],
                "language": "en",
            },
        )
        _finish_job(
            session,
            ids[1],
            JobStatus.failed,
            runtime_ms=1000,
            error_code="internal_error",
            error_message="boom",
        )
    got = api.get(f"/v1/batches/{batch_id}", headers=auth(key)).json()
    assert got["counts"] == {
        "queued": 0,
        "running": 3,
        "succeeded": 1,
        "failed": 1,
        "canceled": 0,
        "total": 5,
    }
    assert got["progress"] == pytest.approx(2 / 5)
    assert got["audio_seconds_done"] == pytest.approx(1.0 + 2.0)
    assert got["audio_seconds_total"] == pytest.approx(1.0 + 2.0 + 3.0 + 4.0)
    assert got["inputs_without_duration"] == 1  # the URL: its length is known once fetched
    # Metered as every job is: runtime_ms x $0.0005/s.
    assert got["cost"] == pytest.approx(0.00075) and got["runtime_ms"] == 1500
    # Rates over the 20 s since the first start; with a URL of unknown length left, the ETA
    # counts jobs: 3 left at 2 jobs / 20 s.
    assert got["rate_jobs_per_second"] == pytest.approx(2 / 20, rel=0.05)
    assert got["rate_audio_seconds_per_second"] == pytest.approx(3 / 20, rel=0.05)
    assert got["eta_seconds"] == pytest.approx(3 / (2 / 20), rel=0.05)
    # Once the URL's length is known, the ETA is remaining audio over the audio rate.
    with session_scope() as session:
        session.execute(update(Job).where(Job.id == ids[4]).values(input_length_ms=3000))
    got = api.get(f"/v1/batches/{batch_id}", headers=auth(key)).json()
    assert got["eta_seconds"] == pytest.approx((3.0 + 4.0 + 3.0) / (3 / 20), rel=0.05)

    lines = [
        json.loads(x)
        for x in api.get(f"/v1/batches/{batch_id}/results", headers=auth(key)).text.splitlines()
    ]
    assert [x["job_id"] for x in lines] == ids  # submission order
    assert (
        lines[0]["text"] == "hello"
        and lines[0]["segments"][0]["end"] == 1.0
        and lines[0]["cost"] == 0.00025
    )
    assert (
        lines[1]["error"] == {"code": "internal_error", "message": "boom"}
        and lines[1]["text"] is None
    )
    only = api.get(
        f"/v1/batches/{batch_id}/results?status=failed", headers=auth(key)
    ).text.splitlines()
    assert [json.loads(x)["job_id"] for x in only] == [ids[1]]


def test_results_stream_in_pages_and_batches_list_with_a_cursor(
    api: TestClient, wav: bytes
) -> None:
    key = new_key("lister")
    made = [
        post(api, key, files=[(f"{i}-{j}.wav", wav) for j in range(i + 1)]).json()["batch"]["id"]
        for i in range(5)
    ]
    with settings_override(batch_results_page_size=2):
        lines = api.get(f"/v1/batches/{made[4]}/results", headers=auth(key)).text.splitlines()
    assert [json.loads(x)["custom_id"] for x in lines] == [f"4-{j}.wav" for j in range(5)]
    seen: list[str] = []
    cursor = None
    while True:
        page = api.get(
            "/v1/batches",
            headers=auth(key),
            params={"limit": 2, **({"cursor": cursor} if cursor else {})},
        ).json()
        seen += [b["id"] for b in page["data"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == made[::-1]
    bad = api.get("/v1/batches", headers=auth(key), params={"cursor": "nope"})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "cursor"


def test_every_batch_route_is_in_the_openapi_contract(api: TestClient) -> None:
    spec = api.get("/openapi.json").json()
    paths = spec["paths"]
    assert paths["/v1/batches"]["post"]["responses"]["201"]["content"]["application/json"][
        "schema"
    ]["$ref"].endswith("BatchAccepted")
    assert (
        "application/x-ndjson"
        in paths["/v1/batches/{batch_id}/results"]["get"]["responses"]["200"]["content"]
    )
    for path in (
        "/v1/batches/{batch_id}",
        "/v1/batches/{batch_id}/cancel",
        "/v1/batches/{batch_id}/seal",
    ):
        for op in paths[path].values():
            assert "$ref" in op["responses"]["200"]["content"]["application/json"]["schema"]


def test_broker_down_mid_batch_fails_the_unsent_jobs_with_a_503(
    api: TestClient, key: CreatedKey, wav: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Jobs are committed first, then sent: those the broker never got end failed (with
    why), never queued forever in silence."""
    import app.jobs.submission

    sent: list[str] = []
    real_send = app.jobs.submission.send_jobs

    def flaky(job_ids: list[str], *, queue: str) -> None:
        # The first message reaches Redis, then the connection drops.
        real_send(job_ids[:1], queue=queue)
        sent.append(job_ids[0])
        raise SendError(1, ConnectionError("Error 111 connecting to redis"))

    monkeypatch.setattr(app.jobs.submission, "send_jobs", flaky)
    r = post(
        api, key, files=[(f"{i}.wav", wav) for i in range(3)], headers={"Idempotency-Key": "down"}
    )
    assert r.status_code == 503 and r.json()["error"]["code"] == "queue_unavailable"
    with session_scope() as session:
        batch_id = session.scalar(select(Batch.id).where(Batch.idempotency_key == "down"))
    states = {j.id: (j.status, j.error_code) for j in jobs_of(batch_id)}  # type: ignore[arg-type]
    assert states.pop(sent[0]) == (JobStatus.queued, None)
    assert set(states.values()) == {(JobStatus.failed, "queue_unavailable")}
    assert len(states) == 2
    # The client sends the same inputs again once Redis is back: the failed ones are
    # re-sent, nothing is duplicated.
    monkeypatch.setattr(app.jobs.submission, "send_jobs", real_send)
    keyed = [{"file": f"{i}.wav", "idempotency_key": f"k{i}"} for i in range(3)]
    again = post(
        api,
        key,
        files=[(f"{i}.wav", wav) for i in range(3)],
        lines=keyed,
        headers={"Idempotency-Key": "down2"},
    )
    assert again.status_code == 201
    batch2 = again.json()["batch"]["id"]
    with session_scope() as session:
        session.execute(
            update(Job)
            .where(Job.batch_id == batch2)
            .values(status=JobStatus.failed, error_code="queue_unavailable", finished_at=utcnow())
        )
    retried = post(
        api,
        key,
        f"/v1/batches/{batch2}/files",
        files=[(f"{i}.wav", wav) for i in range(3)],
        lines=keyed,
    )
    assert retried.status_code == 200 and retried.json()["duplicates"] == 3
    assert {(j.status, j.error_code) for j in jobs_of(batch2)} == {(JobStatus.queued, None)}
    assert len(jobs_of(batch2)) == 3


def _fresh_rate_window() -> None:
    """Start a rate test early in a clock minute: the limit counts per minute, and a window
    that rolled over mid-test would hand out a fresh budget."""
    while time.time() % 60 > 45:
        time.sleep(0.5)


def test_batch_requests_count_against_the_submission_rate(
    api: TestClient, key: CreatedKey, wav: bytes
) -> None:
    limited_key, other = new_key("batch-rate"), new_key("batch-rate-other")
    _fresh_rate_window()
    with settings_override(submit_rate_per_minute=2):
        opened = api.post("/v1/batches", headers=auth(limited_key), json={"open": True})
        added = post(
            api,
            limited_key,
            f"/v1/batches/{opened.json()['batch']['id']}/files",
            files=[("a.wav", wav)],
        )
        refused_create = api.post("/v1/batches", headers=auth(limited_key), json={"urls": [URL]})
        refused_add = post(
            api,
            limited_key,
            f"/v1/batches/{opened.json()['batch']['id']}/files",
            files=[("b.wav", wav)],
        )
        fine = api.post("/v1/batches", headers=auth(other), json={"urls": [URL]})
    assert opened.status_code == 201 and added.status_code == 200, (opened.text, added.text)
    for refused in (refused_create, refused_add):
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["code"] == "rate_limited"
        assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert fine.status_code == 201  # another key has its own budget
    # Refused before the body was read: no job, no blob for the refused inputs.
    assert [j.source_name for j in jobs_of(opened.json()["batch"]["id"])] == ["a.wav"]


def test_batch_uploads_wait_for_an_upload_slot(
    api: TestClient, key: CreatedKey, wav: bytes
) -> None:
    """A batch body is read through the same ``upload_concurrency`` gate as a single
    submission: with every slot taken, the upload waits, and goes through once one frees."""
    portal = api.portal
    assert portal is not None
    settings = get_settings()

    async def gate() -> asyncio.Semaphore:
        async with uploads._upload_slot(settings):  # the loop's gate, made if need be
            pass
        return uploads._gates[asyncio.get_running_loop()]

    slots = portal.call(gate)

    async def take_all() -> int:
        n = 0
        while not slots.locked():
            await slots.acquire()
            n += 1
        return n

    def waiting() -> int:
        return len(getattr(slots, "_waiters", None) or ())

    taken = portal.call(take_all)
    tenant = new_key("batch-upload-slot")
    result: dict[str, Any] = {}
    request = threading.Thread(
        target=lambda: result.update(r=post(api, tenant, files=[("a.wav", wav)])), daemon=True
    )
    try:
        request.start()
        while not portal.call(waiting) and request.is_alive():
            time.sleep(0.02)
        assert request.is_alive(), "the batch upload did not wait for an upload slot"
        with session_scope() as session:
            assert not session.scalar(
                select(func.count()).select_from(Batch).where(Batch.api_key_id == tenant.row.id)
            )
    finally:
        for _ in range(taken):
            portal.call(slots.release)
    request.join(timeout=120)
    assert result["r"].status_code == 201, result["r"].text
    assert result["r"].json()["created"] == 1


def _batch_events(batch_id: str) -> list[WebhookDelivery]:
    with session_scope() as session:
        return list(
            session.scalars(select(WebhookDelivery).where(WebhookDelivery.batch_id == batch_id))
        )


@pytest.mark.parametrize("inputs", [0, 2])
def test_a_canceled_batch_sends_its_own_event_once_inputs_or_not(
    api: TestClient, wav: bytes, receiver: Any, inputs: int
) -> None:
    """Canceled before any input, or with queued inputs only: either way the batch ends at
    the cancel and its event goes out once, as the batch's own delivery (no job's), signed
    with the batch's key."""
    tenant = new_key(f"batch-event-{inputs}")
    opened = api.post(
        "/v1/batches",
        headers=auth(tenant),
        json={"open": True, "webhook": receiver.url + "/batch"},
    )
    batch_id = opened.json()["batch"]["id"]
    if inputs:
        add = post(
            api, tenant, f"/v1/batches/{batch_id}/files", files=[("a.wav", wav), ("b.wav", wav)]
        )
        assert add.json()["created"] == inputs
    c = api.post(f"/v1/batches/{batch_id}/cancel", headers=auth(tenant))
    assert c.status_code == 200 and c.json()["batch"]["status"] == "canceled", c.text
    api.post(f"/v1/batches/{batch_id}/cancel", headers=auth(tenant))  # again: no second event
    assert batches.end_finished_batches() == 0

    events = _batch_events(batch_id)
    assert len(events) == 1 and events[0].job_id is None
    scheduled = deliveries.attempt(events[0].id, settings=get_settings())
    assert scheduled.delay_s is None
    got = receiver.wait_for(1)[0]
    body = json.loads(got.body)
    assert body["type"] == "batch.canceled" and body["batch_id"] == batch_id
    assert body["counts"]["canceled"] == inputs and body["counts"]["total"] == inputs
    timestamp = int(got.headers["webhook-timestamp"])
    expected = sign(tenant.webhook_secret, msg_id=events[0].id, timestamp=timestamp, body=got.body)
    assert got.headers["webhook-signature"] == expected

    listed = api.get(f"/v1/batches/{batch_id}/deliveries", headers=auth(tenant)).json()
    assert [(d["id"], d["status"]) for d in listed["deliveries"]] == [(events[0].id, "delivered")]
    for job in jobs_of(batch_id):  # no job carries the batch's event
        own = api.get(f"/v1/jobs/{job.id}/deliveries", headers=auth(tenant)).json()
        assert own["deliveries"] == []
    other = new_key("batch-event-stranger")
    assert api.get(f"/v1/batches/{batch_id}/deliveries", headers=auth(other)).status_code == 404
