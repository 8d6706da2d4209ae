"""OpenAI's official Python client, pointed at whisperq served by uvicorn, against real
workers with real weights: tiny.en transcribes, multilingual base translates. Every response
format, word timestamps, the client's exception classes, exports of the same jobs, and the
OpenAPI document."""

from __future__ import annotations

import io
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import srt
import uvicorn
import webvtt

from app.api.main import app
from app.api.schemas import InferenceResponse, JobView, TranscriptDocument
from app.infra.db import session_scope
from app.infra.models import Job
from app.jobs import served_model
from app.jobs.keys import CreatedKey
from app.settings import get_settings
from tests.support.api import INFER, auth, new_key, normalise, wer
from tests.support.real_models import base_multilingual_checkpoint, speak, tiny_en_checkpoint
from tests.support.services import WorkerProcess

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    # The client marks translations.create deprecated (OpenAI's newer models do not
    # translate); it is still the call people's code makes, and the one we must serve.
    pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning"),
]

ENGLISH = (
    "Please send the report to the team before the end of the day. "
    "The meeting has been moved to the large room on the second floor."
)
GERMAN = "Guten Morgen. Das Wetter ist heute sehr schön. Ich trinke gerne Kaffee."


class Workers:
    """One worker at a time (the box has two cores): the model a test needs, started once."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.current: tuple[Path, WorkerProcess] | None = None

    def serve(self, model: Path) -> WorkerProcess:
        if self.current is not None and self.current[0] == model:
            return self.current[1]
        switching = self.current is not None
        self.stop()
        proc = WorkerProcess(model=model, log_path=self.tmp / f"{model.stem}.log")
        self.current = (model, proc)
        if switching:
            # The API reads the served model at most CACHE_S late: until then it still
            # answers for the previous worker's model (an English-only one refuses translate).
            time.sleep(served_model.CACHE_S)
        return proc

    def stop(self) -> None:
        if self.current is not None:
            self.current[1].stop()
            self.current = None


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workers]:
    w = Workers(tmp_path_factory.mktemp("openai-workers"))
    yield w
    w.stop()


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
def api(base_url: str) -> Iterator[httpx.Client]:
    """Plain HTTP to the same uvicorn server (not the in-process TestClient: one app served
    from two event loops would split its completion listener between them)."""
    with httpx.Client(base_url=base_url, timeout=600) as c:
        yield c


@pytest.fixture(scope="module")
def key() -> CreatedKey:
    return new_key("openai")


@pytest.fixture(scope="module")
def client(base_url: str, key: CreatedKey) -> Iterator[openai.OpenAI]:
    # No retries: a retry would hide a wrong status behind a second attempt.
    with openai.OpenAI(base_url=base_url + "/v1", api_key=key.key, max_retries=0, timeout=600) as c:
        yield c


@pytest.fixture(scope="module")
def english(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return speak(ENGLISH, tmp_path_factory.mktemp("speech") / "english.wav")


@pytest.fixture(scope="module")
def german(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return speak(GERMAN, tmp_path_factory.mktemp("speech") / "german.wav", voice="de")


def transcript(api: httpx.Client, key: CreatedKey, job_id: str) -> TranscriptDocument:
    r = api.get(f"/v1/jobs/{job_id}/transcript.json", headers=auth(key))
    assert r.status_code == 200, r.text
    return TranscriptDocument.model_validate(r.json())


def assert_srt_matches(text: str, doc: TranscriptDocument) -> None:
    cues = list(srt.parse(text))
    spoken = [s for s in doc.segments if s.text.strip()]
    assert len(cues) == len(spoken) > 0
    for cue, seg in zip(cues, spoken, strict=True):
        assert cue.start.total_seconds() == pytest.approx(seg.start, abs=5e-4)
        assert cue.end.total_seconds() == pytest.approx(seg.end, abs=5e-4)
        assert cue.content.split() == seg.text.split()


def assert_vtt_matches(text: str, doc: TranscriptDocument) -> None:
    def secs(stamp: str) -> float:
        h, m, s = stamp.split(":")
        return int(h) * 3600 + int(m) * 60 + float(s)

    cues = list(webvtt.from_buffer(io.StringIO(text)))
    spoken = [s for s in doc.segments if s.text.strip()]
    assert len(cues) == len(spoken) > 0
    for cue, seg in zip(cues, spoken, strict=True):
        assert secs(cue.start) == pytest.approx(seg.start, abs=5e-4)
        assert secs(cue.end) == pytest.approx(seg.end, abs=5e-4)


def create(client: openai.OpenAI, audio: Path, *, translate: bool = False, **kw: Any) -> Any:
    """Call through the official client, keeping the raw response for x-request-id."""
    api = client.audio.translations if translate else client.audio.transcriptions
    raw = api.with_raw_response.create(file=(audio.name, audio.read_bytes()), **kw)
    return raw.parse(), raw.headers["x-request-id"]


def test_transcribes_real_speech_with_every_response_format(
    client: openai.OpenAI, workers: Workers, english: Path, api: httpx.Client, key: CreatedKey
) -> None:
    worker = workers.serve(tiny_en_checkpoint())
    got, job_id = create(client, english, model="whisper-1")
    assert isinstance(got, openai.types.audio.Transcription), worker.log()[-2000:]
    assert wer(ENGLISH, got.text) < 0.15, got.text
    # The call is a job like any other: metered, listed, on the interactive queue.
    job = JobView.model_validate(api.get(f"/v1/jobs/{job_id}", headers=auth(key)).json())
    assert job.status == "succeeded" and job.inference_status.runtime_ms > 0
    assert job.inference_status.cost > 0 and job.results and job.results.text == got.text
    with session_scope() as session:
        row = session.get(Job, job_id)
        assert row is not None and row.queue == get_settings().queue_interactive
    listed = api.get("/v1/jobs", headers=auth(key)).json()["data"]
    assert job_id in [j["request_id"] for j in listed]

    text, _ = create(client, english, model="whisper-tiny", response_format="text")
    assert isinstance(text, str) and wer(ENGLISH, text) < 0.15

    subtitles, srt_job = create(client, english, model="whisper-1", response_format="srt")
    doc = transcript(api, key, srt_job)
    assert_srt_matches(subtitles, doc)
    vtt, vtt_job = create(client, english, model="whisper-1", response_format="vtt")
    assert vtt.startswith("WEBVTT")
    assert_vtt_matches(vtt, transcript(api, key, vtt_job))
    # The exports of the same job are the same files.
    exported = api.get(f"/v1/jobs/{srt_job}/transcript.srt", headers=auth(key))
    assert exported.status_code == 200 and exported.text == subtitles
    assert_vtt_matches(api.get(f"/v1/jobs/{srt_job}/transcript.vtt", headers=auth(key)).text, doc)
    txt = api.get(f"/v1/jobs/{srt_job}/transcript.txt", headers=auth(key)).text
    assert wer(ENGLISH, txt) < 0.15

    verbose, verbose_job = create(
        client,
        english,
        model="whisper-1",
        response_format="verbose_json",
        timestamp_granularities=["word", "segment"],
        language="en",
        prompt="Report, meeting, floor.",
        temperature=0.0,
    )
    assert isinstance(verbose, openai.types.audio.TranscriptionVerbose)
    assert verbose.language == "english" and wer(ENGLISH, verbose.text) < 0.15
    assert verbose.duration == pytest.approx(len(english.read_bytes()) / 32000, abs=0.1)
    assert verbose.segments and verbose.words
    stored = transcript(api, key, verbose_job)
    for seg, mine in zip(verbose.segments, stored.segments, strict=True):
        assert (seg.id, seg.seek, seg.start, seg.end, seg.text) == (
            mine.id,
            mine.seek,
            mine.start,
            mine.end,
            mine.text,
        )
        assert seg.tokens and seg.tokens == mine.tokens
        assert seg.avg_logprob < 0 and seg.compression_ratio > 0
        assert 0 <= seg.no_speech_prob <= 1 and seg.temperature == 0
    said = [normalise(w.word) for w in verbose.words]
    assert normalise(" ".join(said)).split() == normalise(verbose.text).split()
    starts = [w.start for w in verbose.words]
    assert starts == sorted(starts) and all(w.end >= w.start for w in verbose.words)
    assert stored.segments[0].words and stored.segments[0].words[0].probability > 0

    words_only, _ = create(
        client,
        english,
        model="whisper-1",
        response_format="verbose_json",
        timestamp_granularities=["word"],
    )
    assert words_only.words and words_only.segments is None


def test_word_timestamps_on_the_native_endpoint(
    api: httpx.Client, workers: Workers, english: Path, key: CreatedKey
) -> None:
    workers.serve(tiny_en_checkpoint())
    r = api.post(
        INFER,
        headers=auth(key),
        files={"audio": ("s.wav", english.read_bytes())},
        data={"word_timestamps": "true"},
    )
    assert r.status_code == 200, r.text
    body = InferenceResponse.model_validate(r.json())
    words = [w for s in body.segments for w in s.words or []]
    assert words and all(s.words for s in body.segments)
    assert normalise(" ".join(w.word for w in words)).split() == normalise(body.text).split()
    for seg in body.segments:
        assert seg.words is not None
        assert seg.start - 0.01 <= seg.words[0].start and seg.words[-1].end <= seg.end + 0.01
    # Without the option the hosted API's segment shape is unchanged.
    r = api.post(INFER, headers=auth(key), files={"audio": ("s.wav", english.read_bytes())})
    assert all(set(s) == {"id", "text", "start", "end"} for s in r.json()["segments"])


def test_errors_fire_the_clients_exception_classes(
    client: openai.OpenAI, base_url: str, workers: Workers, english: Path, key: CreatedKey
) -> None:
    workers.serve(tiny_en_checkpoint())
    with (
        openai.OpenAI(base_url=base_url + "/v1", api_key="wq_nope.nope", max_retries=0) as bad,
        pytest.raises(openai.AuthenticationError) as auth_err,
    ):
        bad.audio.transcriptions.create(
            model="whisper-1", file=(english.name, english.read_bytes())
        )
    assert auth_err.value.status_code == 401
    assert auth_err.value.body == {
        "message": "unknown or revoked API key",
        "type": "invalid_request_error",
        "param": None,
        "code": "unauthorized",
    }
    with pytest.raises(openai.BadRequestError) as bad_file:
        client.audio.transcriptions.create(
            model="whisper-1", file=("notes.wav", b"\x00\x01 this is not audio" * 100)
        )
    assert bad_file.value.code == "invalid_audio" and bad_file.value.param == "file"
    assert str(get_settings().blob_dir) not in bad_file.value.message  # no server path
    for kwargs, param in (
        ({"model": "gpt-4o-transcribe"}, "model"),
        (
            {"model": "whisper-1", "response_format": "json", "timestamp_granularities": ["word"]},
            "timestamp_granularities[]",
        ),
        ({"model": "whisper-1", "language": "xx"}, "language"),
        ({"model": "whisper-1", "temperature": 3}, "temperature"),
    ):
        with pytest.raises(openai.BadRequestError) as err:
            client.audio.transcriptions.create(file=(english.name, english.read_bytes()), **kwargs)
        assert err.value.param == param and err.value.type == "invalid_request_error"
    # An English-only model asked to translate: the caller's 400, not a 500 (the worker's
    # unsupported_option, mapped by the shared error enumeration).
    with pytest.raises(openai.BadRequestError) as english_only:
        client.audio.translations.create(
            model="whisper-1", file=(english.name, english.read_bytes())
        )
    assert english_only.value.code == "unsupported_option"


def test_idempotency_key_through_the_client(
    client: openai.OpenAI, workers: Workers, english: Path
) -> None:
    workers.serve(tiny_en_checkpoint())
    headers = {"Idempotency-Key": "openai-idem-1"}
    audio = (english.name, english.read_bytes())
    first = client.audio.transcriptions.with_raw_response.create(
        model="whisper-1", file=audio, extra_headers=headers
    )
    again = client.audio.transcriptions.with_raw_response.create(
        model="whisper-1", file=audio, extra_headers=headers
    )
    assert first.headers["x-request-id"] == again.headers["x-request-id"]
    assert again.headers["idempotent-replayed"] == "true"
    with pytest.raises(openai.ConflictError) as conflict:
        client.audio.transcriptions.create(
            model="whisper-1", file=audio, response_format="text", extra_headers=headers
        )
    assert conflict.value.code == "idempotency_key_reused"
    assert conflict.value.response.headers["x-should-retry"] == "false"


def test_translates_real_speech_with_every_response_format(
    client: openai.OpenAI, workers: Workers, german: Path, api: httpx.Client, key: CreatedKey
) -> None:
    worker = workers.serve(base_multilingual_checkpoint())
    english_words = {"morning", "weather", "coffee"}
    got, _ = create(client, german, translate=True, model="whisper-1")
    assert isinstance(got, openai.types.audio.Translation), worker.log()[-2000:]
    assert english_words <= set(normalise(got.text).split()), got.text
    text, _ = create(client, german, translate=True, model="whisper-1", response_format="text")
    assert english_words <= set(normalise(text).split())
    subtitles, srt_job = create(
        client, german, translate=True, model="whisper-1", response_format="srt"
    )
    doc = transcript(api, key, srt_job)
    assert doc.task == "translate" and doc.language == "de"
    assert_srt_matches(subtitles, doc)
    vtt, vtt_job = create(client, german, translate=True, model="whisper-1", response_format="vtt")
    assert_vtt_matches(vtt, transcript(api, key, vtt_job))
    verbose, _ = create(
        client, german, translate=True, model="whisper-1", response_format="verbose_json"
    )
    assert isinstance(verbose, openai.types.audio.TranslationVerbose)
    assert verbose.language == "german" and verbose.segments
    assert english_words <= set(normalise(verbose.text).split())


def test_openapi_document_validates_and_describes_every_route(base_url: str) -> None:
    from openapi_spec_validator import validate

    doc = httpx.get(base_url + "/openapi.json", timeout=30).json()
    validate(doc)
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            responses = op["responses"]
            ok = [s for s in responses if s.startswith("2")]
            assert ok, f"{method} {path} declares no success response"
            for status in ok:
                assert responses[status].get("content"), f"{method} {path} {status}: no body"
            if any(p["name"] == "authorization" for p in op.get("parameters", [])):
                assert "401" in responses, f"{method} {path}: errors not declared"
            if method == "post" and path.startswith(("/v1/audio/", "/v1/inference/")):
                form = op["requestBody"]["content"]["multipart/form-data"]["schema"]
                assert form["properties"] and form["required"]
    transcriptions = doc["paths"]["/v1/audio/transcriptions"]["post"]
    form = transcriptions["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert {"file", "model", "response_format", "timestamp_granularities[]"} <= set(
        form["properties"]
    )
    error = transcriptions["responses"]["400"]["content"]["application/json"]["schema"]
    assert error == {"$ref": "#/components/schemas/OpenAIErrorResponse"}
    assert "HTTPValidationError" not in str(doc)  # every 422 is in our own error shape
