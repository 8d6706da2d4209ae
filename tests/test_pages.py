"""The pages for people, over HTTP: sign-in cookie, the job page (status, transcript with
timestamps, audio, cost, delivery log), the list of recent jobs, signed links, and that a
page never shows another key's job or the key itself."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from fastapi.testclient import TestClient

from app.api.pages import COOKIE, job_link_token
from app.cli import main
from app.infra import blobs
from app.infra.db import session_scope
from app.infra.models import Job, JobStatus, WebhookAttempt, WebhookDelivery
from app.jobs.keys import CreatedKey
from app.settings import get_settings
from tests.support.api import auth, new_key, noise_wav

SEGMENTS = [
    {"id": 0, "text": " Hello <b>there</b>.", "start": 0.0, "end": 2.5},
    {"id": 1, "text": " Second line.", "start": 62.5, "end": 65.0},
]


def done_job(key: CreatedKey, *, with_audio: bool = True) -> str:
    at = datetime(2026, 5, 1, 9, 0, tzinfo=UTC)
    job = Job(
        api_key_id=key.row.id,
        status=JobStatus.succeeded,
        queue="interactive",
        options={},
        input_length_ms=65000,
        runtime_ms=1234,
        cost=1.234 * 0.0005,
        result={"text": "Hello there. Second line.", "segments": SEGMENTS, "language": "en"},
        webhook_url="https://hooks.example/x",
        created_at=at,
        enqueued_at=at,
        started_at=at,
        finished_at=at,
    )
    with session_scope() as session:
        session.add(job)
        session.flush()
        if with_audio:
            blobs.write_blob(job.id, noise_wav(0.5))
            job.audio_blob = job.id
        delivery = WebhookDelivery(
            job_id=job.id, url=job.webhook_url, body="{}", status="delivered"
        )
        session.add(delivery)
        session.flush()
        session.add(
            WebhookAttempt(
                delivery_id=delivery.id,
                attempt_no=1,
                outcome="retry",
                status_code=503,
                latency_ms=40,
            )
        )
        session.add(
            WebhookAttempt(
                delivery_id=delivery.id,
                attempt_no=2,
                outcome="delivered",
                status_code=200,
                latency_ms=12,
            )
        )
        return job.id


@pytest.fixture
def browser() -> TestClient:
    from tests.support.api import client

    return client()


def sign_in(c: TestClient, key: CreatedKey) -> None:
    r = c.post("/login", data={"api_key": key.key, "next": "/jobs"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/jobs"
    assert key.key not in r.headers["set-cookie"] and "HttpOnly" in r.headers["set-cookie"]


def test_job_page_shows_everything(browser: TestClient) -> None:
    key = new_key("pages")
    job_id = done_job(key)
    r = browser.get(f"/jobs/{job_id}", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/login?next=")
    sign_in(browser, key)
    page = browser.get(f"/jobs/{job_id}")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    assert "succeeded" in html and "$0.000617" in html and "1234 ms" in html
    assert "00:00.00 → 00:02.50" in html and "01:02.50 → 01:05.00" in html
    # Transcript text is escaped, never markup.
    assert "Hello &lt;b&gt;there&lt;/b&gt;." in html and "<b>there</b>" not in html
    assert f'src="/jobs/{job_id}/audio"' in html
    assert "https://hooks.example/x" in html and "503" in html and "delivered" in html
    audio = browser.get(f"/jobs/{job_id}/audio")
    assert audio.status_code == 200 and audio.headers["content-type"] == "audio/wav"
    assert audio.content == noise_wav(0.5)
    listing = browser.get("/jobs").text
    assert job_id in listing and key.row.prefix in listing and key.key not in listing


def test_other_keys_and_bad_sessions_see_nothing(browser: TestClient) -> None:
    owner, stranger = new_key("owner"), new_key("stranger")
    job_id = done_job(owner)
    sign_in(browser, stranger)
    assert browser.get(f"/jobs/{job_id}").status_code == 404
    assert browser.get(f"/jobs/{job_id}/audio").status_code == 404
    assert job_id not in browser.get("/jobs").text
    # A forged or tampered cookie is no session.
    tampered = browser.cookies[COOKIE][:-2] + "00"
    browser.cookies.clear()
    browser.cookies.set(COOKIE, tampered)
    assert browser.get("/jobs", follow_redirects=False).status_code == 303
    # A revoked key's session ends at once.
    sign_in(browser, owner)
    assert browser.get(f"/jobs/{job_id}").status_code == 200
    assert main(["keys", "revoke", owner.row.prefix]) == 0
    assert browser.get(f"/jobs/{job_id}", follow_redirects=False).status_code == 404
    bad = browser.post("/login", data={"api_key": owner.key})
    assert bad.status_code == 401 and "unknown or revoked" in bad.text


def test_signed_links(api: TestClient, browser: TestClient) -> None:
    key, other = new_key("links"), new_key("links-other")
    job_id = done_job(key, with_audio=False)
    other_job = done_job(other, with_audio=False)
    r = api.post(f"/v1/jobs/{job_id}/link", headers=auth(key))
    assert r.status_code == 200
    url = r.json()["url"]
    page = browser.get(url)  # no cookie, no key
    assert page.status_code == 200 and "Second line." in page.text
    assert "not kept after the job ends" in page.text
    token = url.split("token=")[1]
    # The token is for that job only, and not forgeable or extendable.
    assert browser.get(f"/jobs/{other_job}?token={token}").status_code == 404
    expires, sig = token.split(".")
    assert browser.get(f"/jobs/{job_id}?token={int(expires) + 1}.{sig}").status_code == 404
    stale = job_link_token(get_settings(), job_id, now=0).url
    assert browser.get(stale).status_code == 404
    assert api.post(f"/v1/jobs/{other_job}/link", headers=auth(key)).status_code == 404


def test_login_redirect_stays_on_this_site(browser: TestClient) -> None:
    key = new_key("redirect")
    r = browser.post(
        "/login", data={"api_key": key.key, "next": "https://evil.example/"}, follow_redirects=False
    )
    assert r.status_code == 303 and r.headers["location"] == "/jobs"


def make_batch(api: TestClient, key: CreatedKey, n: int) -> tuple[str, list[str]]:
    """A real batch through the API (uploads probed, jobs queued on the bulk queue)."""
    files = [("file", (f"call-{i}.wav", noise_wav(0.5, seed=i), "audio/wav")) for i in range(n)]
    r = api.post("/v1/batches", headers=auth(key), files=files)
    assert r.status_code == 201, r.text
    return r.json()["batch"]["id"], [i["job_id"] for i in r.json()["inputs"]]


def outcome(job_id: str, status: JobStatus, *, runtime_ms: int = 0) -> None:
    """What a worker would have written (the page only reads the rows)."""
    now = datetime.now(UTC)
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.status = status
        job.started_at = now
        job.runtime_ms = runtime_ms
        job.cost = runtime_ms / 1000 * 0.0005
        if status != JobStatus.running:
            job.finished_at = now
        if status == JobStatus.succeeded:
            job.result = {"text": "x", "segments": [], "language": "en"}
        if status == JobStatus.failed:
            job.error_code, job.error_message = "invalid_audio", "not audio"


def test_batches_show_their_progress_and_lead_to_their_jobs(
    api: TestClient, browser: TestClient
) -> None:
    key, other = new_key("batch-pages"), new_key("batch-pages-other")
    single = done_job(key, with_audio=False)
    batch_id, jobs = make_batch(api, key, 4)
    outcome(jobs[0], JobStatus.succeeded, runtime_ms=3000)
    outcome(jobs[1], JobStatus.failed, runtime_ms=1000)
    outcome(jobs[2], JobStatus.running)
    sign_in(browser, key)

    listing = browser.get("/jobs").text
    api_view = api.get(f"/v1/batches/{batch_id}", headers=auth(key)).json()
    assert api_view["progress"] == 0.5 and api_view["audio_seconds_done"] == 1.0
    row = listing.split(f'data-batch="{batch_id}"')[1].split("</tr>")[0]
    assert "in_progress" in row and "50%" in row and "2/4 done" in row
    for count in ("1 queued", "1 running", "1 succeeded", "1 failed"):
        assert count in row
    assert "1.0 of 2.0 s" in row and f"${api_view['cost']:.6f}" in row
    assert f'href="/jobs?batch={batch_id}"' in row
    # Batch jobs are reached through the batch; single jobs stay on the list.
    assert single in listing and not any(j in listing for j in jobs)
    assert 'http-equiv="refresh"' in listing  # something is still running

    page = browser.get(f"/jobs?batch={batch_id}")
    assert page.status_code == 200 and "50%" in page.text
    assert all(f'href="/jobs/{j}"' in page.text for j in jobs) and "call-2.wav" in page.text
    assert f'href="/jobs?batch={batch_id}&amp;status=failed"' in page.text
    failed = browser.get(f"/jobs?batch={batch_id}&status=failed").text
    assert jobs[1] in failed and "invalid_audio" in failed
    assert not any(j in failed for j in (jobs[0], jobs[2], jobs[3]))
    assert browser.get(f"/jobs/{jobs[0]}").status_code == 200  # the job's own page

    outcome(jobs[2], JobStatus.succeeded, runtime_ms=2000)
    outcome(jobs[3], JobStatus.succeeded, runtime_ms=2000)
    assert api.get(f"/v1/batches/{batch_id}", headers=auth(key)).json()["status"] == "completed"
    done = browser.get("/jobs").text
    row = done.split(f'data-batch="{batch_id}"')[1].split("</tr>")[0]
    assert "completed" in row and "100%" in row and "4/4 done" in row and "3 succeeded" in row
    assert "2.0 of 2.0 s" in row and "$0.004000" in row
    assert 'http-equiv="refresh"' not in done

    # Another key sees neither the batch nor its jobs.
    sign_in(browser, other)
    assert batch_id not in browser.get("/jobs").text
    assert browser.get(f"/jobs?batch={batch_id}").status_code == 404
    browser.cookies.clear()
    r = browser.get(f"/jobs?batch={batch_id}", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/login?next=")


def test_a_big_batch_shows_its_first_jobs_and_says_where_the_rest_are(
    api: TestClient, browser: TestClient
) -> None:
    from app.api import pages

    key = new_key("big-batch")
    batch_id, jobs = make_batch(api, key, 3)
    sign_in(browser, key)
    shown = pages.BATCH_JOBS_SHOWN
    pages.BATCH_JOBS_SHOWN = 2
    try:
        page = browser.get(f"/jobs?batch={batch_id}").text
    finally:
        pages.BATCH_JOBS_SHOWN = shown
    assert jobs[0] in page and jobs[1] in page and jobs[2] not in page
    assert "The first 2 of 3" in page and f"/v1/batches/{batch_id}/results" in page
