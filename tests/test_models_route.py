"""Which models the service accepts, and what the served one can do: ``GET /v1/models`` for
OpenAI's client, the served model's name accepted, no server path in a refusal, and options
an English-only model cannot honour refused at submission, from what the worker publishes
when it loads its model (worker/model_loading.py). No worker runs here: a refusal must come
before any job exists, and an accepted request is seen queued."""

from __future__ import annotations

import io
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path

import httpx
import openai
import pytest
import redis
import torch
import uvicorn
from sqlalchemy import func, select

from app.api.main import app
from app.infra.db import session_scope
from app.infra.models import Job
from app.jobs import served_model
from app.jobs.keys import CreatedKey
from app.settings import get_settings
from tests.support.api import INFER, auth, new_key, noise_wav, settings_override
from tests.support.random_model import TINY_RANDOM, random_model
from worker.model_loading import load_model_or_fallback, publish_served

pytestmark = [
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning"),
]

# Nothing waits for a worker (none runs) nor trips a limit; an accepted request is queued.
# The model as a fresh install has it, whatever a developer's .env says.
NO_WAIT = {
    "sync_wait_s": 0.0,
    "submit_rate_per_minute": 0,
    "max_active_jobs_per_key": 0,
    "model": "tiny",
}
# A hook nobody listens on: with a webhook the native route answers 202 once the job is queued.
HOOK = "http://127.0.0.1:9/hook"
SECRET_PATH = "/srv/whisperq-private/weights/customer-finetune.pt"


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def key() -> CreatedKey:
    return new_key("models")


@pytest.fixture(scope="module")
def http(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def client(base_url: str, key: CreatedKey) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=base_url + "/v1", api_key=key.key, max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture(autouse=True)
def nothing_published() -> Iterator[None]:
    """Each test starts as a fresh deployment does: no worker has loaded a model yet."""
    url = get_settings().redis_url
    redis.Redis.from_url(url).delete(served_model.KEY)
    served_model._cache.clear()
    with settings_override(**NO_WAIT):
        yield
    redis.Redis.from_url(url).delete(served_model.KEY)
    served_model._cache.clear()


def publish(tmp_path: Path, name: str, *, multilingual: bool) -> None:
    """What a worker does when it loads a checkpoint: the real load, the real publication.
    Random weights of whisper's two vocabularies (51864 tokens: English-only)."""
    dims = TINY_RANDOM if multilingual else replace(TINY_RANDOM, n_vocab=51864)
    model = random_model(dims=dims)
    path = tmp_path / f"{name}.pt"
    torch.save({"dims": asdict(model.dims), "model_state_dict": model.state_dict()}, path)
    loaded, _ = load_model_or_fallback(str(path), device="cpu", redis_url=get_settings().redis_url)
    assert loaded.is_multilingual == multilingual


def jobs_of(key: CreatedKey) -> int:
    with session_scope() as session:
        count = session.scalar(
            select(func.count()).select_from(Job).where(Job.api_key_id == key.row.id)
        )
    return int(count or 0)


def wav() -> io.BytesIO:
    buf = io.BytesIO(noise_wav(1.0))
    buf.name = "noise.wav"
    return buf


def transcribe_status(http: httpx.Client, key: CreatedKey, model: str) -> httpx.Response:
    return http.post(
        "/v1/audio/transcriptions",
        headers=auth(key),
        data={"model": model},
        files={"file": ("noise.wav", noise_wav(1.0), "audio/wav")},
    )


def test_models_are_listed_for_the_official_client(
    client: openai.OpenAI, http: httpx.Client
) -> None:
    models = client.models.list().data
    # The default model falls back to tiny.en offline: both may be what runs.
    assert [m.id for m in models] == ["whisper-1", "whisper-tiny", "tiny", "tiny.en"]
    assert all(m.object == "model" and m.owned_by and m.created > 0 for m in models)
    assert client.models.retrieve("tiny.en").id == "tiny.en"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    assert http.get("/v1/models").status_code == 401  # keyed like every /v1 route


def test_the_fallback_name_is_accepted_before_any_worker_published(
    http: httpx.Client, key: CreatedKey
) -> None:
    r = transcribe_status(http, key, "tiny.en")
    # Accepted: queued, and still queued when the (zero) sync wait ends.
    assert r.status_code == 504, r.text
    assert r.json()["error"]["code"] == "job_still_running"


def test_the_published_name_is_accepted(
    tmp_path: Path, http: httpx.Client, client: openai.OpenAI, key: CreatedKey
) -> None:
    with settings_override(**{**NO_WAIT, "model": SECRET_PATH}):
        assert transcribe_status(http, key, "tiny.en").status_code == 400  # not known yet
        publish(tmp_path, "tiny.en", multilingual=False)
        r = transcribe_status(http, key, "tiny.en")
        assert r.status_code == 504, r.text
        assert "tiny.en" in [m.id for m in client.models.list().data]


def test_an_unknown_model_is_refused_naming_no_server_path(
    http: httpx.Client, client: openai.OpenAI, key: CreatedKey
) -> None:
    with settings_override(**{**NO_WAIT, "model": SECRET_PATH}):
        r = transcribe_status(http, key, "gpt-4")
        names = [m.id for m in client.models.list().data]
    assert r.status_code == 400
    error = r.json()["error"]
    assert (error["code"], error["param"]) == ("invalid_option", "model")
    assert "whisper-1" in error["message"]
    assert "/" not in r.text and "customer-finetune" not in r.text, r.text
    assert names == ["whisper-1", "whisper-tiny"]


def test_english_only_model_refuses_translation_at_submission(
    tmp_path: Path, http: httpx.Client, client: openai.OpenAI, key: CreatedKey
) -> None:
    publish(tmp_path, "tiny.en", multilingual=False)
    jobs_before = jobs_of(key)
    blob_dir = get_settings().blob_dir
    blobs_before = set(blob_dir.rglob("*")) if blob_dir.exists() else set()
    for fields, field in (({"task": "translate"}, "task"), ({"language": "fr"}, "language")):
        r = http.post(
            INFER,
            headers=auth(key),
            data={**fields, "webhook": HOOK},
            files={"audio": ("noise.wav", noise_wav(1.0), "audio/wav")},
        )
        assert r.status_code == 422, r.text
        error = r.json()["error"]
        assert (error["code"], error["field"]) == ("unsupported_option", field)
        assert "English-only" in error["message"]
    with pytest.raises(openai.BadRequestError) as err:
        client.audio.translations.create(model="whisper-1", file=wav())
    assert err.value.code == "unsupported_option"
    with pytest.raises(openai.BadRequestError) as err:
        client.audio.transcriptions.create(model="whisper-1", file=wav(), language="fr")
    assert (err.value.code, err.value.param) == ("unsupported_option", "language")
    assert jobs_of(key) == jobs_before
    # The refused uploads were streamed into the blob store first: none is left there.
    blobs_after = set(blob_dir.rglob("*")) if blob_dir.exists() else set()
    assert not {p for p in blobs_after - blobs_before if p.is_file()}


@pytest.mark.parametrize("multilingual", [True, None], ids=["multilingual", "unpublished"])
def test_translation_is_accepted_unless_the_model_is_english_only(
    multilingual: bool | None, tmp_path: Path, http: httpx.Client, key: CreatedKey
) -> None:
    if multilingual is not None:
        publish(tmp_path, "tiny", multilingual=multilingual)
    r = http.post(
        INFER,
        headers=auth(key),
        data={"task": "translate", "language": "fr", "webhook": HOOK},
        files={"audio": ("noise.wav", noise_wav(1.0), "audio/wav")},
    )
    assert r.status_code == 202, r.text
    assert r.json()["inference_status"]["status"] == "queued"


def test_a_checkpoint_path_is_published_by_its_shape_never_by_its_path() -> None:
    url = get_settings().redis_url
    shaped = replace(TINY_RANDOM, n_audio_state=384, n_text_state=384, n_text_layer=4)
    english_only = random_model(dims=replace(shaped, n_vocab=51864))
    publish_served(english_only, SECRET_PATH, redis_url=url)
    served = served_model.current(url)
    assert served is not None and (served.name, served.multilingual) == ("tiny.en", False)
    publish_served(random_model(), SECRET_PATH, redis_url=url)  # a shape of its own
    served = served_model.current(url)
    assert served is not None and (served.name, served.multilingual) == ("customer-finetune", True)


def test_a_worker_publishes_its_model_and_its_backstop_logs_no_traceback(
    tmp_path: Path, http: httpx.Client, key: CreatedKey
) -> None:
    from tests.support.services import WorkerProcess

    model = random_model(dims=replace(TINY_RANDOM, n_vocab=51864))
    path = tmp_path / "tiny.en.pt"
    torch.save({"dims": asdict(model.dims), "model_state_dict": model.state_dict()}, path)
    worker = WorkerProcess(model=path, log_path=tmp_path / "worker.log", concurrency=1)
    url = get_settings().redis_url
    try:
        with settings_override(**{**NO_WAIT, "sync_wait_s": 120.0}):
            served_model._cache.clear()  # the worker published from its own process
            jobs_before = jobs_of(key)
            r = translate(http, key)
            assert r.status_code == 422 and "request_id" not in r.json(), r.text
            assert jobs_of(key) == jobs_before  # refused at submission
            # Published facts can be missing (Redis flushed): the worker's check fails the job.
            redis.Redis.from_url(url).delete(served_model.KEY)
            served_model._cache.clear()
            r = translate(http, key)
            assert r.status_code == 422, r.text
            assert r.json()["error"]["code"] == "unsupported_option" and r.json()["request_id"]
    finally:
        worker.stop()
    log = worker.log()
    assert "unsupported_option" in log and "Traceback" not in log, log[-4000:]


def translate(http: httpx.Client, key: CreatedKey) -> httpx.Response:
    return http.post(
        INFER,
        headers=auth(key),
        data={"task": "translate"},
        files={"audio": ("noise.wav", noise_wav(1.0), "audio/wav")},
    )
