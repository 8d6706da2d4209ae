"""Issue 14: weak secrets are refused at process start in production, with one clear line;
and per-key submission limits answer 429 with Retry-After."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from app.infra.db import session_scope
from app.infra.models import Job, JobStatus
from app.settings import DEFAULT_SECRET, Settings, weak_secret_reason
from tests.support.api import INFER, auth, new_key, noise_wav, settings_override
from tests.support.services import REPO

WEAK = ["", " ", "x", "short-pepper", DEFAULT_SECRET, "a" * 40, "abababababababababab"]
STARTS = {
    "api": [sys.executable, "-m", "uvicorn", "app.api.main:app", "--port", "0"],
    "cli": [sys.executable, "-m", "app.cli", "keys", "create", "--name", "x"],
    "celery": [sys.executable, "-c", "import worker.celery_app"],
}


@pytest.mark.parametrize("pepper", WEAK)
def test_weak_peppers_are_weak(pepper: str) -> None:
    assert weak_secret_reason(pepper) is not None
    with pytest.raises(ValueError, match="WHISPERQ_KEY_PEPPER"):
        Settings(environment="production", key_pepper=pepper)


def test_a_long_random_pepper_is_fine() -> None:
    assert weak_secret_reason("mWq3-Zt8_pL2xVb9Rk4sYh7") is None


@pytest.mark.parametrize(
    ("process", "pepper"),
    [("api", ""), ("api", "x"), ("api", DEFAULT_SECRET), ("cli", "x"), ("celery", "x")],
)
def test_production_start_with_a_weak_pepper_exits_with_one_clear_line(
    process: str, pepper: str
) -> None:
    env = {**os.environ, "WHISPERQ_ENVIRONMENT": "production", "WHISPERQ_KEY_PEPPER": pepper}
    proc = subprocess.run(
        STARTS[process], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr  # no traceback
    assert lines[0].startswith("whisperq: refusing to start: WHISPERQ_KEY_PEPPER is")
    if pepper:
        assert pepper not in lines[0].split(" is ", 1)[1].replace(f'"{DEFAULT_SECRET}"', "")


def test_submission_rate_limit_is_a_429_with_retry_after(api: TestClient) -> None:
    key, other = new_key("rate"), new_key("rate-other")
    with settings_override(submit_rate_per_minute=2, sync_wait_s=0):
        codes = [
            api.post(INFER, headers=auth(key), data={"task": "bogus"}).status_code for _ in range(3)
        ]
        limited = api.post(INFER, headers=auth(key), data={"task": "bogus"})
        fine = api.post(INFER, headers=auth(other), data={"task": "bogus"})
    # The first two are counted and refused for their own fault; then the key is limited.
    assert codes[:2] == [422, 422] and codes[2] == 429
    assert limited.status_code == 429
    assert limited.json()["error"]["code"] == "rate_limited"
    assert 1 <= int(limited.headers["retry-after"]) <= 60
    assert fine.status_code == 422  # another key has its own budget


def test_the_openai_routes_answer_a_limit_in_openais_shape(api: TestClient) -> None:
    """A 429 there is what OpenAI's client expects: its error shape and Retry-After (the
    client maps 429 to RateLimitError and honours Retry-After)."""
    key = new_key("rate-openai")
    with settings_override(submit_rate_per_minute=1, sync_wait_s=0):
        for _ in range(2):
            limited = api.post(
                "/v1/audio/transcriptions", headers=auth(key), data={"model": "whisper-1"}
            )
    assert limited.status_code == 429
    error = limited.json()["error"]
    assert error["code"] == "rate_limited" and error["type"] and "message" in error, error
    assert int(limited.headers["retry-after"]) >= 1


def test_active_jobs_cap_is_a_429(api: TestClient) -> None:
    key = new_key("active-cap")
    files = {"audio": ("a.wav", noise_wav(0.5))}
    with settings_override(max_active_jobs_per_key=2, sync_wait_s=0, submit_rate_per_minute=0):
        first = [api.post(INFER, headers=auth(key), files=files).status_code for _ in range(2)]
        third = api.post(INFER, headers=auth(key), files=files)
        assert first == [202, 202]
        assert third.status_code == 429 and third.json()["error"]["code"] == "too_many_active_jobs"
        assert int(third.headers["retry-after"]) > 0
        with session_scope() as session:  # one finishes: room again
            session.execute(
                update(Job).where(Job.api_key_id == key.row.id).values(status=JobStatus.canceled)
            )
        assert api.post(INFER, headers=auth(key), files=files).status_code == 202
