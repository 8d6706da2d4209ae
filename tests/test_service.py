"""Issue 2 end to end: API → Postgres → Redis → a real Celery worker process → Whisper
(real tiny.en weights) → result → webhook, and every kind of bad input."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from standardwebhooks import Webhook

from app.infra.db import session_scope
from app.infra.models import Job
from app.infra.queue import SendError
from app.jobs.keys import CreatedKey
from app.settings import get_settings
from tests.support.api import (
    INFER,
    auth,
    new_key,
    settings_override,
    wait_delivery,
    wait_job,
    wer,
)
from tests.support.real_models import speak, tiny_en_checkpoint
from tests.support.services import Receiver, WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SPEECH = (
    "Please send the report to the team before the end of the day. "
    "The meeting has been moved to the large room on the second floor. "
    "Thank you for your help with this project."
)


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    proc = WorkerProcess(
        model=tiny_en_checkpoint(), log_path=tmp_path_factory.mktemp("worker") / "worker.log"
    )
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def speech_wav(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return speak(SPEECH, tmp_path_factory.mktemp("audio") / "speech.wav").read_bytes()


@pytest.fixture(scope="module")
def key() -> CreatedKey:
    return new_key("service")


def job_count() -> int:
    with session_scope() as session:
        return int(session.scalar(select(func.count()).select_from(Job)) or 0)


def queued_messages() -> int:
    settings = get_settings()
    client_ = redis.Redis.from_url(settings.redis_url)
    try:
        return int(client_.llen(settings.queue_interactive))
    finally:
        client_.close()


def test_flower_shows_the_worker(worker: WorkerProcess, tmp_path: Path) -> None:
    import os
    import socket
    import subprocess
    import sys
    import time

    import httpx

    from tests.support.services import REPO

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "FLOWER_UNAUTHENTICATED_API": "true"}
    log = (tmp_path / "flower.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "flower", "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        names: list[str] = []
        while time.monotonic() < deadline and not any(n.startswith("whisperq-") for n in names):
            time.sleep(0.5)
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/api/workers?refresh=1", timeout=10)
                names = list(r.json()) if r.status_code == 200 else []
            except httpx.HTTPError:
                continue
        assert any(n.startswith("whisperq-") for n in names), (tmp_path / "flower.log").read_text()
        page = httpx.get(f"http://127.0.0.1:{port}/workers", timeout=10)
        assert page.status_code == 200 and "Flower" in page.text
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def test_requires_an_api_key(api: TestClient) -> None:
    for headers in (
        {},
        {"Authorization": "bearer nope"},
        {"Authorization": "bearer wq_x.y"},
        {"Authorization": "Basic abc"},
    ):
        r = api.post(INFER, headers=headers, files={"audio": ("a.wav", b"x")})
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "unauthorized"


def test_sync_transcription_of_real_speech(
    api: TestClient, key: CreatedKey, worker: WorkerProcess, speech_wav: bytes
) -> None:
    r = api.post(INFER, headers=auth(key), files={"audio": ("speech.wav", speech_wav)})
    assert r.status_code == 200, (r.text, worker.log()[-3000:])
    body = r.json()
    assert wer(SPEECH, body["text"]) < 0.15, body["text"]
    assert body["language"] == "en"
    assert body["segments"] and all(
        set(s) == {"id", "text", "start", "end"} for s in body["segments"]
    )
    assert body["segments"][0]["start"] >= 0 and body["segments"][-1]["end"] > 5
    status = body["inference_status"]
    assert status["status"] == "succeeded"
    assert status["runtime_ms"] > 0
    assert status["cost"] == pytest.approx(status["runtime_ms"] / 1000 * 0.0005)
    assert status["tokens_generated"] > 10
    assert status["tokens_input"] == pytest.approx(body["input_length_ms"] / 20, abs=1)
    assert body["input_length_ms"] > 5000
    job = api.get(f"/v1/jobs/{body['request_id']}", headers=auth(key)).json()
    assert job["status"] == "succeeded" and job["results"]["text"] == body["text"]
    assert job["inference_status"] == status


def test_webhook_mode_answers_at_once_and_delivers_a_signed_result(
    api: TestClient,
    key: CreatedKey,
    worker: WorkerProcess,
    speech_wav: bytes,
    receiver: Receiver,
) -> None:
    r = api.post(
        INFER,
        headers=auth(key),
        files={"audio": ("speech.wav", speech_wav)},
        data={"webhook": receiver.url + "/hook"},
    )
    assert r.status_code == 202
    assert r.json()["inference_status"]["status"] == "queued"
    request_id = r.json()["request_id"]
    (got,) = receiver.wait_for(1)
    # Verified by the Standard Webhooks reference library, not by our own code.
    payload = Webhook(key.webhook_secret).verify(got.body, got.headers)
    assert payload["request_id"] == request_id
    assert payload["inference_status"]["status"] == "succeeded"
    assert payload["inference_status"]["runtime_ms"] > 0
    assert wer(SPEECH, payload["results"]["text"]) < 0.15
    assert set(payload["results"]) == {"text", "segments", "language", "input_length_ms"}
    # The receiver may answer before the worker has recorded the attempt: wait for it.
    delivery = wait_delivery(api, key, request_id, status="delivered")
    deliveries = api.get(f"/v1/jobs/{request_id}/deliveries", headers=auth(key)).json()
    assert len(deliveries["deliveries"]) == 1
    assert delivery["id"] == got.headers["webhook-id"]
    assert [a["outcome"] for a in delivery["attempts"]] == ["delivered"]
    assert delivery["attempts"][0]["status_code"] == 200


def test_audio_by_url_and_data_url(
    api: TestClient, key: CreatedKey, worker: WorkerProcess, speech_wav: bytes, receiver: Receiver
) -> None:
    receiver.respond = lambda req, _n: (200, {"content-type": "audio/wav"}, 0.0, speech_wav)
    r = api.post(INFER, headers=auth(key), data={"audio": receiver.url + "/speech.wav"})
    assert r.status_code == 200, r.text
    assert wer(SPEECH, r.json()["text"]) < 0.15
    assert r.json()["input_length_ms"] > 5000
    data_url = "data:audio/wav;base64," + base64.b64encode(speech_wav).decode()
    r = api.post(INFER, headers=auth(key), data={"audio": data_url})
    assert r.status_code == 200, r.text
    assert wer(SPEECH, r.json()["text"]) < 0.15


def test_audio_failing_in_the_worker_fails_the_job_and_still_fires_the_webhook(
    api: TestClient,
    key: CreatedKey,
    worker: WorkerProcess,
    receiver: Receiver,
) -> None:
    receiver.respond = lambda req, _n: (
        (200, {}, 0.0, b"this is not audio at all" * 50)
        if req.path == "/junk.mp3"
        else (200, {}, 0.0, b"ok")
    )
    r = api.post(
        INFER,
        headers=auth(key),
        data={"audio": receiver.url + "/junk.mp3", "webhook": receiver.url + "/hook"},
    )
    assert r.status_code == 202
    hooks = [q for q in receiver.wait_for(2) if q.path == "/hook"]
    payload = Webhook(key.webhook_secret).verify(hooks[0].body, hooks[0].headers)
    assert payload["inference_status"]["status"] == "failed"
    assert payload["error"]["code"] == "invalid_audio" and payload["error"]["message"]
    assert payload["results"] is None
    job = wait_job(api, key, r.json()["request_id"])
    assert job["status"] == "failed" and job["error"]["code"] == "invalid_audio"


def test_sync_failure_is_a_clear_error(
    api: TestClient, key: CreatedKey, worker: WorkerProcess, receiver: Receiver
) -> None:
    receiver.respond = lambda req, _n: (404, {}, 0.0, b"nope")
    r = api.post(INFER, headers=auth(key), data={"audio": receiver.url + "/missing.wav"})
    assert r.status_code == 422
    assert r.json()["error"]["code"] == "audio_fetch_failed"
    assert r.json()["inference_status"]["status"] == "failed"


def test_another_tenants_job_is_a_404(
    api: TestClient, key: CreatedKey, worker: WorkerProcess, speech_wav: bytes
) -> None:
    r = api.post(INFER, headers=auth(key), files={"audio": ("speech.wav", speech_wav)})
    job_id = r.json()["request_id"]
    other = new_key("other")
    for path in (f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/deliveries"):
        assert api.get(path, headers=auth(other)).status_code == 404
        assert api.get(path, headers=auth(other)).json()["error"]["code"] == "job_not_found"
    assert api.get("/v1/jobs/doesnotexist", headers=auth(key)).status_code == 404
    assert api.get(f"/v1/jobs/{job_id}", headers=auth(key)).status_code == 200


BAD_INPUTS = [
    ({}, None, 422, "missing_audio", "audio"),
    ({}, b"", 400, "empty_audio", "audio"),
    ({}, b"\x00\x01garbage" * 200, 400, "invalid_audio", "audio"),
    ({"task": "summarize"}, "wav", 422, "invalid_option", "task"),
    ({"temperature": "7"}, "wav", 422, "invalid_option", "temperature"),
    ({"no_speech_threshold": "-1"}, "wav", 422, "invalid_option", "no_speech_threshold"),
    ({"suppress_tokens": "1;2"}, "wav", 422, "invalid_option", "suppress_tokens"),
    ({"language": "xx"}, "wav", 422, "invalid_option", "language"),
    ({"webhook": "ftp://example.com/hook"}, "wav", 422, "invalid_url", "webhook"),
    ({"webhook": "http://10.0.0.1/hook"}, "wav", 422, "webhook_forbidden_address", "webhook"),
    ({"audio": "file:///etc/passwd"}, None, 422, "invalid_url", "audio_url"),
    (
        {"audio": "http://169.254.169.254/latest"},
        None,
        422,
        "audio_url_forbidden_address",
        "audio_url",
    ),
    ({"audio": "data:audio/wav;base64,@@@"}, None, 422, "invalid_audio_url", "audio"),
]


@pytest.mark.parametrize(("fields", "upload", "status", "code", "field"), BAD_INPUTS)
def test_bad_input_is_a_clear_4xx_and_nothing_is_enqueued(
    api: TestClient,
    key: CreatedKey,
    speech_wav: bytes,
    fields: dict[str, str],
    upload: bytes | str | None,
    status: int,
    code: str,
    field: str,
) -> None:
    before = (job_count(), queued_messages())
    files = None
    if upload is not None:
        files = {"audio": ("a.wav", speech_wav if upload == "wav" else upload)}
    r = api.post(INFER, headers=auth(key), data=fields, files=files)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert (error["code"], error["field"]) == (code, field)
    assert error["message"]
    assert (job_count(), queued_messages()) == before


def test_oversized_upload_is_413(api: TestClient, key: CreatedKey, speech_wav: bytes) -> None:
    before = job_count()
    with settings_override(max_upload_bytes=10_000):
        r = api.post(INFER, headers=auth(key), files={"audio": ("a.wav", speech_wav)})
    assert r.status_code == 413
    assert r.json()["error"] == {
        "code": "audio_too_large",
        "field": "audio",
        "message": r.json()["error"]["message"],
    }
    assert job_count() == before


def test_too_long_audio_is_refused_before_any_gpu_time(
    api: TestClient, key: CreatedKey, speech_wav: bytes
) -> None:
    with settings_override(max_audio_seconds=2.0):
        r = api.post(INFER, headers=auth(key), files={"audio": ("a.wav", speech_wav)})
    assert r.status_code == 413 and r.json()["error"]["code"] == "audio_too_long"


def test_job_options_are_stored_as_sent(
    api: TestClient, key: CreatedKey, worker: WorkerProcess, speech_wav: bytes, receiver: Receiver
) -> None:
    fields = {
        "task": "transcribe",
        "language": "en",
        "temperature": "0",
        "patience": "1.5",
        "suppress_tokens": "-1,220",
        "initial_prompt": "Report, meeting, project.",
        "condition_on_previous_text": "false",
        "temperature_increment_on_fallback": "0.25",
        "compression_ratio_threshold": "2.0",
        "logprob_threshold": "-2",
        "no_speech_threshold": "0.5",
        "webhook": receiver.url + "/hook",
    }
    r = api.post(INFER, headers=auth(key), files={"audio": ("s.wav", speech_wav)}, data=fields)
    assert r.status_code == 202
    job = wait_job(api, key, r.json()["request_id"])
    assert job["status"] == "succeeded", job
    assert job["options"] == {
        "task": "transcribe",
        "language": "en",
        "temperature": 0.0,
        "patience": 1.5,
        "suppress_tokens": "-1,220",
        "initial_prompt": "Report, meeting, project.",
        "condition_on_previous_text": False,
        "temperature_increment_on_fallback": 0.25,
        "compression_ratio_threshold": 2.0,
        "logprob_threshold": -2.0,
        "no_speech_threshold": 0.5,
        "word_timestamps": False,
        "prepend_punctuations": "\"'“¿([{-",
        "append_punctuations": "\"'.。,，!！?？:：”)]}、",
    }
    assert wer(SPEECH, job["results"]["text"]) < 0.15
    assert json.loads(receiver.wait_for(1)[0].body)["request_id"] == job["request_id"]


def test_blob_is_stored_under_a_server_made_name(
    api: TestClient, key: CreatedKey, worker: WorkerProcess, speech_wav: bytes
) -> None:
    r = api.post(
        INFER, headers=auth(key), files={"audio": ("../../etc/evil name;rm -rf.wav", speech_wav)}
    )
    assert r.status_code == 200
    with session_scope() as session:
        job = session.get(Job, r.json()["request_id"])
        assert job is not None and job.audio_blob is not None
        blob = job.audio_blob
    assert blob.isalnum()  # made by the server (uploads are streamed in before the job row)
    stored = Path(get_settings().blob_dir) / blob
    assert stored.is_file() and stored.read_bytes() == speech_wav


def test_broker_down_at_submission_is_a_503_and_the_job_ends_failed(
    api: TestClient, key: CreatedKey, speech_wav: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    import app.jobs.submission

    def broker_down(job_ids: list[str], *, queue: str) -> None:
        raise SendError(0, ConnectionError("Error 111 connecting to redis"))

    monkeypatch.setattr(app.jobs.submission, "send_jobs", broker_down)
    r = api.post(INFER, headers=auth(key), files={"audio": ("a.wav", speech_wav)})
    assert r.status_code == 503 and r.json()["error"]["code"] == "queue_unavailable"
    job = api.get(f"/v1/jobs/{r.json()['request_id']}", headers=auth(key)).json()
    assert job["status"] == "failed" and job["error"]["code"] == "queue_unavailable"
