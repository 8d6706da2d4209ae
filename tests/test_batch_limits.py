"""Bounds on ``POST /v1/batches`` found by black-box testing, over the real API, Postgres and
Redis: the manifest and URL fields are capped while the body streams in (in bytes and in
inputs, the rest of the body left unread), the manifest is parsed off the event loop, a
deeply nested line is the caller's error, an Idempotency-Key is tied to its request, and a
refused request names the manifest's line and leaves no batch behind."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from app.api import batch_inputs
from app.api import batches as batches_api
from app.errors import ServiceError
from app.infra.db import session_scope
from app.infra.models import Batch, Job
from app.jobs import batches
from app.jobs.keys import CreatedKey
from tests.support.api import auth, new_key, noise_wav, settings_override
from tests.test_batches import URL, blob_count, jobs_of, manifest, post

pytestmark = pytest.mark.integration

MIB = 1024 * 1024
CHUNK = 64 * 1024
BOUNDARY = b"limitsboundary"


@pytest.fixture(scope="module")
def key() -> CreatedKey:
    return new_key("batch-limits")


def batch_count(key: CreatedKey) -> int:
    with session_scope() as session:
        return int(
            session.scalar(
                select(func.count()).select_from(Batch).where(Batch.api_key_id == key.row.id)
            )
            or 0
        )


# ---- a body the server may stop reading ------------------------------------------------


def part_head(name: str) -> bytes:
    return (
        b"--" + BOUNDARY + b"\r\n"
        b'Content-Disposition: form-data; name="' + name.encode() + b'"\r\n\r\n'
    )


def manifest_body(line: bytes, total: int) -> Iterator[bytes]:
    """One manifest part of ``total`` bytes of ``line`` repeated, made as it is read, in
    chunks of ``CHUNK`` bytes (a line may span chunks)."""
    yield part_head("manifest")
    stream = line * max(1, -(-2 * CHUNK // len(line)))  # at least two chunks long
    pos = sent = 0
    while sent < total:
        piece = stream[pos : pos + CHUNK]
        piece += stream[: CHUNK - len(piece)]
        pos = (pos + CHUNK) % len(stream)
        sent += len(piece)
        yield piece
    yield b"\r\n--" + BOUNDARY + b"--\r\n"


def url_fields_body(total: int) -> Iterator[bytes]:
    """``url`` field after ``url`` field, each small, ``total`` bytes in all."""
    url = (URL + "?pad=" + "p" * 1900).encode()
    sent = 0
    while sent < total:
        part = part_head("url") + url + b"\r\n"
        sent += len(part)
        yield part
    yield b"--" + BOUNDARY + b"--\r\n"


def send_streamed(api: TestClient, key: CreatedKey, body: Iterator[bytes]) -> tuple[Any, int]:
    """POST ``body`` to the app in-process, chunk by chunk, as a server hands it over; returns
    (status, headers, JSON answer) and how many bytes the app asked for. Once the answer has
    started the client is gone (Connection: close), as a server would say."""
    consumed = 0
    answer: dict[str, Any] = {"body": b""}
    ended = False

    async def receive() -> dict[str, Any]:
        nonlocal consumed, ended
        if "status" in answer or ended:
            return {"type": "http.disconnect"}
        chunk = next(body, None)
        if chunk is None:
            ended = True
            return {"type": "http.request", "body": b"", "more_body": False}
        consumed += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            answer["status"] = message["status"]
            answer["headers"] = {k.decode().lower(): v.decode() for k, v in message["headers"]}
        elif message["type"] == "http.response.body":
            answer["body"] += message.get("body", b"")

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/batches",
        "raw_path": b"/v1/batches",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"testserver"),
            (b"authorization", f"bearer {key.key}".encode()),
            (b"content-type", b"multipart/form-data; boundary=" + BOUNDARY),
            (b"transfer-encoding", b"chunked"),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
        "state": dict(getattr(api, "app_state", {})),
    }
    app: Any = api.app

    async def run() -> None:
        await app(scope, receive, send)

    assert api.portal is not None
    api.portal.call(run)
    return (answer["status"], answer["headers"], json.loads(answer["body"])), consumed


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(
            lambda: manifest_body(b'{"url": "%s"}\n' % URL.encode(), 64 * MIB), id="lines"
        ),
        pytest.param(
            lambda: manifest_body(
                b'{"url": "%s", "name": "%s"}\n' % (URL.encode(), b"n" * 60_000), 64 * MIB
            ),
            id="long-lines",
        ),
        pytest.param(lambda: url_fields_body(64 * MIB), id="url-fields"),
    ],
)
def test_manifest_and_urls_over_the_cap_are_refused_before_the_rest_is_read(
    api: TestClient, key: CreatedKey, body: Any
) -> None:
    cap = 1 * MIB
    before = batch_count(key)
    # The input limit high enough that only the byte cap can stop these bodies early.
    with settings_override(batch_max_manifest_bytes=cap, batch_max_inputs_per_request=100_000):
        (status, headers, answer), consumed = send_streamed(api, key, body())
    assert status == 413, answer
    assert answer["error"]["code"] == "request_too_large"
    assert headers.get("connection") == "close"  # the server must not drain the rest
    # Refused at the chunk that crossed the cap: 64 MiB offered, about 1 MiB read.
    assert consumed <= cap + 2 * CHUNK + 4096, consumed
    assert batch_count(key) == before


def test_the_input_limit_is_checked_while_the_manifest_streams_in(
    api: TestClient, key: CreatedKey
) -> None:
    line = b'{"url": "%s"}\n' % URL.encode()
    # Blank lines are no inputs: they count toward the byte cap only.
    with settings_override(batch_max_inputs_per_request=50):
        (status, _, answer), consumed = send_streamed(
            api, key, manifest_body(b"\n \r\n" + line, 64 * MIB)
        )
    assert status == 413, answer
    assert answer["error"]["code"] == "too_many_inputs"
    # 51 lines are about 2 KiB: the first chunk already holds them.
    assert consumed <= 2 * CHUNK, consumed

    # At the limit exactly, blank lines and all, the batch is made.
    body = (b"\n \r\n" + line) * 50
    with settings_override(batch_max_inputs_per_request=50):
        r = api.post(
            "/v1/batches",
            headers=auth(key),
            files=[("manifest", ("m.jsonl", body, "application/x-ndjson"))],
        )
    assert r.status_code == 201, r.text
    assert r.json()["created"] == 50


def test_a_second_manifest_part_is_refused(api: TestClient, key: CreatedKey) -> None:
    one = manifest({"url": URL})
    r = api.post("/v1/batches", headers=auth(key), files=[("manifest", one), ("manifest", one)])
    assert r.status_code == 422, r.text
    assert r.json()["error"] == {
        "code": "invalid_request",
        "message": "'manifest' given more than once",
        "field": "manifest",
    }


# ---- the event loop while a manifest is parsed -----------------------------------------


def test_healthz_is_answered_while_a_large_manifest_is_parsed(
    api: TestClient, key: CreatedKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 1,000 legal lines of about 3 KiB: a few MB of JSON to parse.
    lines = [
        {"url": f"{URL}?n={n}", "custom_id": f"row-{n}", "name": f"{n}-" + "x" * 990}
        for n in range(1000)
    ]
    real = batch_inputs.parse_manifest
    parsing = threading.Event()
    healthz_answered = threading.Event()
    answered_during_parse: list[bool] = []

    def parse_while_healthz_asks(data: bytes) -> Any:
        parsing.set()
        # On the event loop this wait would stop /healthz from being answered at all.
        answered_during_parse.append(healthz_answered.wait(timeout=15))
        return real(data)

    monkeypatch.setattr(batches_api, "parse_manifest", parse_while_healthz_asks)
    result: list[Any] = []
    sender = threading.Thread(target=lambda: result.append(post(api, key, lines=lines)))
    sender.start()
    assert parsing.wait(timeout=60)
    health = api.get("/healthz")
    healthz_answered.set()
    sender.join(timeout=120)
    assert health.status_code == 200
    assert answered_during_parse == [True]  # /healthz came back before the parse ended
    assert result and result[0].status_code == 201, result
    assert result[0].json()["created"] == 1000


# ---- what a manifest line may hold -----------------------------------------------------


def test_deeply_nested_json_in_a_line_is_the_callers_error(
    api: TestClient, key: CreatedKey
) -> None:
    before = batch_count(key)
    nested = b'{"url": "%s", "options": {"temperature": %s%s}}' % (
        URL.encode(),
        b"[" * 100_000,
        b"]" * 100_000,
    )
    body = json.dumps({"url": URL}).encode() + b"\n" + nested + b"\n"
    r = api.post(
        "/v1/batches",
        headers=auth(key),
        files=[("manifest", ("m.jsonl", body, "application/x-ndjson"))],
    )
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_manifest"
    assert error["field"] == "manifest[2]"
    assert error["message"].startswith("line 2:")
    assert batch_count(key) == before


def test_an_overlong_line_is_refused_as_it_streams(api: TestClient, key: CreatedKey) -> None:
    (status, _, answer), consumed = send_streamed(
        api,
        key,
        manifest_body(b" " + b'{"url": "%s", "name": "' % URL.encode() + b"n" * MIB, 8 * MIB),
    )
    assert status == 413, answer
    assert answer["error"] == {
        "code": "field_too_large",
        "message": answer["error"]["message"],
        "field": "manifest",
    }
    assert consumed <= 512 * 1024, consumed


# ---- errors name the line; a refused request leaves nothing ---------------------------


def test_a_bad_url_is_named_by_its_line_and_leaves_no_batch(
    api: TestClient, key: CreatedKey
) -> None:
    before = batch_count(key)
    body = (
        json.dumps({"url": URL, "name": "a\u2028b"}, ensure_ascii=False).encode()
        + b"\n\n"  # a blank line 2 still counts as a line
        + json.dumps({"url": URL + "?3"}).encode()
        + b"\r\n"
        + json.dumps({"url": "ftp://example.com/a.wav"}).encode()
        + b"\n"
    )
    for data in ({}, {"open": "true"}):
        r = api.post(
            "/v1/batches",
            headers={**auth(key), "Idempotency-Key": f"bad-line-{len(data)}"},
            files=[("manifest", ("m.jsonl", body, "application/x-ndjson"))],
            data=data,
        )
        assert r.status_code == 422, r.text
        assert r.json()["error"]["code"] == "invalid_url"
        assert r.json()["error"]["field"] == "manifest[4].url"
    assert batch_count(key) == before


def test_a_refusal_while_its_jobs_are_written_leaves_no_batch(
    api: TestClient, key: CreatedKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = batches._add_jobs

    def refuse(*args: Any, **kwargs: Any) -> Any:
        real(*args, **kwargs)  # the rows are written, then the request is refused
        raise ServiceError(409, "batch_sealed", "refused after the jobs were written")

    monkeypatch.setattr(batches, "_add_jobs", refuse)
    before = batch_count(key)
    blobs_before = blob_count()
    with session_scope() as session:
        jobs_before = session.scalar(select(func.count()).select_from(Job))
    r = post(
        api,
        key,
        files=[("a.wav", noise_wav(0.5, seed=4))],
        data={"url": [URL], "open": "true"},
        headers={"Idempotency-Key": "refused-midway"},
    )
    assert r.status_code == 409, r.text
    assert batch_count(key) == before
    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(Job)) == jobs_before
    assert blob_count() == blobs_before
    monkeypatch.undo()
    # The key was not used up: the same request now makes its batch.
    again = post(
        api,
        key,
        data={"url": [URL], "open": "true"},
        headers={"Idempotency-Key": "refused-midway"},
    )
    assert again.status_code == 201, again.text


def test_a_long_file_name_is_cut_to_a_custom_id(api: TestClient, key: CreatedKey) -> None:
    name = "d/" * 200 + "a.wav"
    r = post(api, key, files=[(name, noise_wav(0.5, seed=5))])
    assert r.status_code == 201, r.text
    (job,) = jobs_of(r.json()["batch"]["id"])
    assert job.custom_id == name[:200] and job.source_name == name


# ---- Idempotency-Key ---------------------------------------------------------------------


def test_a_key_reused_with_other_inputs_is_a_409_and_changes_nothing(
    api: TestClient, key: CreatedKey
) -> None:
    wav = noise_wav(0.5, seed=6)
    headers = {"Idempotency-Key": "made-once"}
    lines = [{"url": URL, "custom_id": "u"}, {"file": "a.wav", "idempotency_key": "k"}]
    first = post(
        api, key, files=[("a.wav", wav)], lines=lines, data={"open": "true"}, headers=headers
    )
    assert first.status_code == 201, first.text
    batch_id = first.json()["batch"]["id"]
    blobs_before = blob_count()

    # The same request again: the same batch and jobs, nothing added, the upload dropped.
    again = post(
        api, key, files=[("a.wav", wav)], lines=lines, data={"open": "true"}, headers=headers
    )
    assert again.status_code == 200, again.text
    assert again.json()["batch"]["id"] == batch_id
    assert again.json()["created"] == 0 and again.json()["duplicates"] == 2
    assert [i["job_id"] for i in again.json()["inputs"]] == [
        i["job_id"] for i in first.json()["inputs"]
    ]
    assert blob_count() == blobs_before

    # Other inputs, other options, or no open=true (which would seal it): each a 409.
    others: list[dict[str, Any]] = [
        {"files": [("a.wav", wav)], "lines": [lines[0]], "data": {"open": "true"}},
        {"files": [("a.wav", noise_wav(0.5, seed=7))], "lines": lines, "data": {"open": "true"}},
        {"files": [("a.wav", wav)], "lines": lines, "data": {"open": "true", "language": "de"}},
        {"files": [("a.wav", wav)], "lines": lines},
        {"data": {"url": [URL + "?other"]}},
    ]
    for other in others:
        r = post(api, key, headers=headers, **other)
        assert r.status_code == 409, (other, r.text)
        assert r.json()["error"]["code"] == "idempotency_key_reused"
    assert len(jobs_of(batch_id)) == 2
    got = api.get(f"/v1/batches/{batch_id}", headers=auth(key)).json()
    assert got["status"] == "open"
    assert blob_count() == blobs_before  # the refused requests' uploads are gone too

    # JSON creates keep the same rule.
    body = {"urls": [URL], "options": {"language": "en"}}
    j1 = api.post("/v1/batches", headers={**auth(key), "Idempotency-Key": "j"}, json=body)
    j2 = api.post("/v1/batches", headers={**auth(key), "Idempotency-Key": "j"}, json=body)
    j3 = api.post(
        "/v1/batches", headers={**auth(key), "Idempotency-Key": "j"}, json={"urls": [URL + "?2"]}
    )
    assert (j1.status_code, j2.status_code, j3.status_code) == (201, 200, 409)
    assert j2.json()["batch"]["id"] == j1.json()["batch"]["id"]
    assert len(jobs_of(j1.json()["batch"]["id"])) == 1


# ---- the batch page's count of inputs whose length is unknown ---------------------------


def test_only_unfetched_urls_count_as_inputs_without_a_length(
    api: TestClient, key: CreatedKey
) -> None:
    from tests.support.api import client

    # A file that is not audio: its job is born failed, with no length, and never gets one.
    r = post(api, key, files=[("a.wav", noise_wav(0.5, seed=8)), ("bad.wav", b"not audio")])
    assert r.status_code == 201, r.text
    uploads_only = r.json()["batch"]
    assert uploads_only["counts"]["failed"] == 1
    assert uploads_only["inputs_without_duration"] == 0
    r = post(api, key, data={"url": [URL]})
    assert r.status_code == 201, r.text
    one_url = r.json()["batch"]
    assert one_url["inputs_without_duration"] == 1

    with client() as browser:
        signed = browser.post(
            "/login", data={"api_key": key.key, "next": "/jobs"}, follow_redirects=False
        )
        assert signed.status_code == 303
        page = browser.get(f"/jobs?batch={uploads_only['id']}")
        assert page.status_code == 200
        assert "not fetched yet" not in page.text
        page = browser.get(f"/jobs?batch={one_url['id']}")
        assert "(1 URL input not fetched yet)" in page.text
