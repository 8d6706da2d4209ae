"""What a browser and /docs need beyond the pages themselves: security headers on every answer,
a sign-in no other site can forge, a sign-out that ends the session on the server, absolute
share links, exports that download as files, and an OpenAPI document with its auth scheme."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from app.api.pages import COOKIE
from app.infra import blobs
from app.infra.db import session_scope
from app.infra.models import Batch, Job, JobStatus
from app.jobs.keys import CreatedKey
from tests.support.api import auth, client, new_key, noise_wav, settings_override

SEGMENTS = [{"id": 0, "text": " Hello.", "start": 0.0, "end": 1.5}]
EVIL = "https://evil.example"


def done_job(key: CreatedKey, *, source_name: str | None = None) -> str:
    at = datetime(2026, 5, 1, 9, 0, tzinfo=UTC)
    with session_scope() as session:
        job = Job(
            api_key_id=key.row.id,
            status=JobStatus.succeeded,
            queue="interactive",
            options={},
            input_length_ms=1500,
            result={"text": "Hello.", "segments": SEGMENTS, "language": "en"},
            source_name=source_name,
            created_at=at,
            finished_at=at,
        )
        session.add(job)
        session.flush()
        blobs.write_blob(job.id, noise_wav(0.2))
        job.audio_blob = job.id
        return job.id


@pytest.fixture
def browser() -> TestClient:
    return client()


def sign_in(c: TestClient, key: CreatedKey, **headers: str) -> None:
    r = c.post("/login", data={"api_key": key.key}, headers=headers, follow_redirects=False)
    assert r.status_code == 303 and COOKIE in r.headers["set-cookie"], r.text


def test_every_answer_carries_security_headers(browser: TestClient) -> None:
    key = new_key("headers")
    job_id = done_job(key)
    with session_scope() as session:
        batch = Batch(api_key_id=key.row.id)
        session.add(batch)
        session.flush()
        batch_id = batch.id
    sign_in(browser, key)
    answers = {
        "login": browser.get("/login"),
        "jobs": browser.get("/jobs"),
        "job": browser.get(f"/jobs/{job_id}"),
        "batch": browser.get(f"/jobs?batch={batch_id}"),
        "audio": browser.get(f"/jobs/{job_id}/audio"),
        "no audio": browser.get("/jobs/0123abcd/audio"),
        "api": browser.get(f"/v1/jobs/{job_id}", headers=auth(key)),
        "docs": browser.get("/docs"),
    }
    for name, r in answers.items():
        assert r.headers.get("x-content-type-options") == "nosniff", name
        assert r.headers.get("x-frame-options") == "DENY", name
        assert r.headers.get("referrer-policy") == "same-origin", name
        assert "frame-ancestors 'none'" in r.headers.get("content-security-policy", ""), name
    assert answers["audio"].status_code == 200 and answers["no audio"].status_code == 404
    assert batch_id in answers["batch"].text
    for name in ("login", "jobs", "job", "batch"):
        page = answers[name]
        csp = page.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "unsafe-inline" not in csp, name
        # The policy lets the page's own style in, and nothing the page does is blocked.
        nonce = re.search(r"style-src 'nonce-([^']+)'", csp)
        assert nonce is not None and f'<style nonce="{nonce.group(1)}">' in page.text, name
        assert "<script" not in page.text and " style=" not in page.text, name
    assert "media-src 'self'" in answers["job"].headers["content-security-policy"]
    # A fresh nonce per page: one seen in a page is no use for injecting another.
    again = browser.get("/login").headers["content-security-policy"]
    assert again != answers["login"].headers["content-security-policy"]


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": EVIL},
        {"Origin": "null"},  # a sandboxed frame, or a page with Referrer-Policy: no-referrer
        {"Origin": "http://testserver.evil.example"},
        {"Sec-Fetch-Site": "cross-site", "Origin": EVIL},
        {"Sec-Fetch-Site": "same-site", "Origin": "http://other.testserver"},
        {"Sec-Fetch-Site": "cross-site"},
    ],
)
def test_a_sign_in_from_another_site_is_refused(
    browser: TestClient, headers: dict[str, str]
) -> None:
    key = new_key("csrf")
    r = browser.post("/login", data={"api_key": key.key}, headers=headers, follow_redirects=False)
    assert r.status_code == 403 and r.json()["error"]["code"] == "cross_origin_request"
    assert "set-cookie" not in r.headers and COOKIE not in browser.cookies
    assert r.headers["x-frame-options"] == "DENY"


def test_same_origin_forms_still_work(browser: TestClient) -> None:
    key = new_key("same-origin")
    sign_in(browser, key, Origin="http://testserver")
    browser.cookies.clear()
    sign_in(browser, key, **{"Sec-Fetch-Site": "same-origin", "Origin": "http://testserver"})
    # A forged sign-out is refused too, and the session survives it.
    r = browser.post("/logout", headers={"Origin": EVIL}, follow_redirects=False)
    assert r.status_code == 403
    assert browser.get("/jobs", follow_redirects=False).status_code == 200


def test_sign_out_ends_the_session_on_the_server(browser: TestClient) -> None:
    key = new_key("logout")
    job_id = done_job(key)
    sign_in(browser, key)
    old = browser.cookies[COOKIE]
    assert browser.get(f"/jobs/{job_id}").status_code == 200
    r = browser.post("/logout", headers={"Origin": "http://testserver"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login"
    # Someone who copied the cookie before sign-out gets nothing with it.
    browser.cookies.clear()
    browser.cookies.set(COOKIE, old)
    r = browser.get("/jobs", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/login")
    assert browser.get(f"/jobs/{job_id}").status_code == 404
    assert browser.get(f"/jobs/{job_id}/audio").status_code == 404
    # Another session of the same key is its own: signing out of one leaves the other.
    sign_in(browser, key)
    other = client()
    sign_in(other, key)
    browser.post("/logout")
    assert other.get("/jobs", follow_redirects=False).status_code == 200


def test_job_link_is_absolute(api: TestClient) -> None:
    key = new_key("link")
    job_id = done_job(key)
    url = api.post(f"/v1/jobs/{job_id}/link", headers=auth(key)).json()["url"]
    assert url.startswith(f"http://testserver/jobs/{job_id}?token="), url
    assert client().get(url).status_code == 200  # no cookie, no key
    # Not entered as a context: a second lifespan would close the api fixture's listener.
    proxied = TestClient(api.app, base_url="https://whisperq.example", root_path="/wq")
    url = proxied.post(f"/v1/jobs/{job_id}/link", headers=auth(key)).json()["url"]
    assert url.startswith(f"https://whisperq.example/wq/jobs/{job_id}?token="), url


@pytest.mark.parametrize("fmt", ["json", "txt", "srt", "vtt"])
def test_every_export_downloads_as_a_file(api: TestClient, fmt: str) -> None:
    key = new_key("export")
    job_id = done_job(key)
    r = api.get(f"/v1/jobs/{job_id}/transcript.{fmt}", headers=auth(key))
    assert r.status_code == 200
    assert r.headers["content-disposition"] == f'attachment; filename="{job_id}.{fmt}"'


def test_openapi_declares_the_bearer_scheme_and_tags(api: TestClient) -> None:
    doc = api.get("/openapi.json").json()
    schemes = doc["components"]["securitySchemes"]
    assert list(schemes.values()) == [
        {"type": "http", "scheme": "bearer", "description": schemes["HTTPBearer"]["description"]}
    ]
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            assert op.get("tags") and op["tags"] != ["default"], (method, path)
            if path.startswith("/v1/"):
                assert op.get("security") == [{"HTTPBearer": []}], (method, path)
                assert "401" in op["responses"], (method, path)
                names = [p["name"].lower() for p in op.get("parameters", [])]
                assert "authorization" not in names, (method, path)
    infer = doc["paths"]["/v1/inference/openai/whisper-tiny"]["post"]
    assert infer["tags"] == ["inference"] and infer["summary"] != "Infer"
    # The scheme changed the docs, not who gets in: our 401 for a missing or odd header.
    for header in ({}, {"Authorization": "Basic eDp5"}, {"Authorization": "bearer   "}):
        r = api.get("/v1/jobs", headers=header)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized", header
    assert api.get("/v1/jobs", headers={"Authorization": "BEARER " + new_key().key}).is_success


def test_jobs_list_names_the_uploaded_file(browser: TestClient) -> None:
    key = new_key("names")
    named = done_job(key, source_name="<i>meeting</i>.wav")
    unnamed = done_job(key)
    sign_in(browser, key)
    listing = browser.get("/jobs").text
    assert named in listing and unnamed in listing
    assert "&lt;i&gt;meeting&lt;/i&gt;.wav" in listing and "<i>" not in listing
    assert "&lt;i&gt;meeting&lt;/i&gt;.wav" in browser.get(f"/jobs/{named}").text


@pytest.mark.parametrize(
    ("sent", "shown"),
    [("meeting notes.wav", "meeting notes.wav"), ("../../etc/passwd.wav", "passwd.wav")],
)
def test_a_single_upload_is_listed_under_its_file_name(
    browser: TestClient, sent: str, shown: str
) -> None:
    """Both upload routes keep the file's own name (its last part: never a path)."""
    key = new_key("upload-names")
    # No worker here: the sync answers come back at once as still queued (202 / 504).
    with settings_override(sync_wait_s=0):
        for route, field in (
            ("/v1/inference/openai/whisper-tiny", "audio"),
            ("/v1/audio/transcriptions", "file"),
        ):
            r = browser.post(
                route,
                headers=auth(key),
                files={field: (sent, noise_wav(0.3))},
                data={"model": "whisper-1"} if field == "file" else {},
            )
            assert r.status_code in (202, 504), r.text
    with session_scope() as session:
        names = session.scalars(select(Job.source_name).where(Job.api_key_id == key.row.id)).all()
    assert names == [shown, shown]
