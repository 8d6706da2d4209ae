"""Black-box security findings: Flower answered /metrics and /healthcheck without its login;
weak Flower passwords and predictable peppers passed production's check; the API's /metrics
was open to anyone; the OpenAI route's too-large upload was not in OpenAI's error shape."""

from __future__ import annotations

import base64
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr, ValidationError

from app.settings import MIN_SECRET_BITS, Settings, estimated_secret_bits, weak_secret_reason
from tests.support.api import new_key, settings_override
from tests.support.services import REPO
from tests.support.stack import ServerProcess

FLOWER_USER = "ops"
FLOWER_PASSWORD = secrets.token_urlsafe(24)
STRONG = "mWq3-Zt8_pL2xVb9Rk4sYh7"
MAKE = "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"


def refusal(err: pytest.ExceptionInfo[ValidationError]) -> str:
    """What a refused start prints (pydantic's own str() also echoes every input)."""
    return "; ".join(str(e["msg"]) for e in err.value.errors())


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


# --- Flower: with a password set, nothing answers without it -----------------------------


@pytest.fixture(scope="module")
def flower(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    env = {"WHISPERQ_FLOWER_USER": FLOWER_USER, "WHISPERQ_FLOWER_PASSWORD": FLOWER_PASSWORD}
    log = tmp_path_factory.mktemp("flower") / "flower.log"
    server = ServerProcess(["flower", "--host", "127.0.0.1"], log_path=log, env=env, ready_path="/")
    try:
        yield server
    finally:
        server.stop()


# Flower 2.2 exempts /metrics and /healthcheck from --basic-auth; static files and the 404
# page were open too, and the API paths answer their own 401.
FLOWER_PATHS = [
    "/",
    "/metrics",
    "/healthcheck",
    "/workers",
    "/api/workers",
    "/static/css/flower.css",
    "/no-such-page",
]


@pytest.mark.parametrize("path", FLOWER_PATHS)
def test_flower_refuses_every_path_without_its_login(flower: ServerProcess, path: str) -> None:
    wrong = secrets.token_urlsafe(24)
    for headers in (
        {},
        basic(FLOWER_USER, wrong),
        basic("someone", FLOWER_PASSWORD),
        {"Authorization": "Basic !!not-base64!!"},
        {"Authorization": "Bearer " + FLOWER_PASSWORD},
    ):
        for method in ("GET", "HEAD", "POST"):
            r = httpx.request(method, flower.url + path, headers=headers, timeout=20)
            assert r.status_code == 401, (method, path, headers, r.status_code, r.text[:200])
            assert r.headers["www-authenticate"].startswith("Basic")
            assert "flower_" not in r.text and r.text.strip() != "OK"


def test_flower_serves_its_pages_metrics_and_healthcheck_with_the_login(
    flower: ServerProcess,
) -> None:
    login = basic(FLOWER_USER, FLOWER_PASSWORD)
    page = httpx.get(flower.url + "/", headers=login, timeout=20)
    assert page.status_code == 200 and "Flower" in page.text
    metrics = httpx.get(flower.url + "/metrics", headers=login, timeout=20)
    assert metrics.status_code == 200 and "flower_" in metrics.text
    health = httpx.get(flower.url + "/healthcheck", headers=login, timeout=20)
    assert health.status_code == 200 and health.text == "OK"
    # The scheme is case-blind (RFC 7617); the login itself is not.
    lower = {"Authorization": login["Authorization"].replace("Basic", "basic")}
    assert httpx.get(flower.url + "/healthcheck", headers=lower, timeout=20).status_code == 200


def test_flower_password_without_a_user_is_refused() -> None:
    from app.errors import UserError
    from app.settings import get_settings
    from app.stack import flower_argv

    s = get_settings().model_copy(
        update={"flower_user": "", "flower_password": SecretStr(FLOWER_PASSWORD)}
    )
    with pytest.raises(UserError, match="WHISPERQ_FLOWER_USER"):
        flower_argv(s, host="127.0.0.1", port=5555)


# --- Secrets: length is not strength ------------------------------------------------------

PREDICTABLE = [
    "password12345678",
    "Password1234567890!",
    "P@ssw0rdP@ssw0rd!!",
    "qwertyuiopasdfghjkl",
    "0123456789abcdefgh",
    "changeme-changeme-changeme",
    "letmein!Welcome2024",
    "Xk9#Lm2!Xk9#Lm2!Xk9#Lm2!",
]
WEAK_FLOWER = ["x", "hunter2", "flower-password!", *PREDICTABLE]


@pytest.mark.parametrize("pepper", PREDICTABLE)
def test_predictable_peppers_are_refused_in_production(pepper: str) -> None:
    assert estimated_secret_bits(pepper) < MIN_SECRET_BITS
    with pytest.raises(ValidationError, match="WHISPERQ_KEY_PEPPER is predictable") as err:
        Settings(environment="production", key_pepper=pepper)
    assert MAKE in refusal(err) and pepper not in refusal(err)


@pytest.mark.parametrize("password", WEAK_FLOWER)
def test_weak_flower_passwords_are_refused_in_production(password: str) -> None:
    with pytest.raises(ValidationError, match="WHISPERQ_FLOWER_PASSWORD is ") as err:
        Settings(environment="production", key_pepper=STRONG, flower_password=password)
    assert MAKE in refusal(err) and password not in refusal(err)


@pytest.mark.parametrize("token", ["x", "metrics-token", *PREDICTABLE])
def test_weak_metrics_tokens_are_refused_in_production(token: str) -> None:
    with pytest.raises(ValidationError, match="WHISPERQ_METRICS_TOKEN is "):
        Settings(environment="production", key_pepper=STRONG, metrics_token=token)


def test_strong_secrets_are_accepted_in_production() -> None:
    for _ in range(200):  # what the messages tell people to run never trips the estimate
        assert weak_secret_reason(secrets.token_urlsafe(32)) is None
        assert weak_secret_reason(secrets.token_hex(16)) is None
    s = Settings(
        environment="production",
        key_pepper=STRONG,
        flower_password=secrets.token_urlsafe(32),
        metrics_token=secrets.token_hex(32),
    )
    assert s.flower_password is not None and s.metrics_token is not None
    # Empty means unset (compose passes variables the shell left empty).
    assert Settings(environment="production", key_pepper=STRONG, flower_password="").key_pepper


def test_local_mode_keeps_working_with_its_generated_pepper() -> None:
    # scripts/up.sh (`make up`) writes this pepper; local Flower/metrics secrets stay free.
    generated = secrets.token_urlsafe(32)
    s = Settings(environment="local", key_pepper=generated, flower_password="x", metrics_token="y")
    assert s.key_pepper == generated


def test_production_flower_with_a_weak_password_exits_with_one_clear_line(
    tmp_path: Path,
) -> None:
    env = {
        **os.environ,
        "WHISPERQ_ENVIRONMENT": "production",
        "WHISPERQ_KEY_PEPPER": STRONG,
        "WHISPERQ_FLOWER_USER": "admin",
        "WHISPERQ_FLOWER_PASSWORD": "x",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "app.cli", "flower", "--port", "1"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "WHISPERQ_FLOWER_PASSWORD is shorter than 16 characters" in lines[0]
    assert MAKE in lines[0]


# --- The API's /metrics ------------------------------------------------------------------


def test_metrics_asks_for_its_bearer_token(api: TestClient) -> None:
    token = secrets.token_urlsafe(32)
    with settings_override(metrics_token=SecretStr(token)):
        for headers in (
            {},
            {"Authorization": "Bearer " + token[:-1]},
            {"Authorization": "Bearer"},
            {"Authorization": "Basic " + token},
            {"Authorization": token},
        ):
            r = api.get("/metrics", headers=headers)
            assert r.status_code == 401, headers
            assert r.headers["www-authenticate"] == "Bearer"
            assert r.json()["error"]["code"] == "unauthorized"
            assert "whisperq_" not in r.text
        ok = api.get("/metrics", headers={"Authorization": "bearer " + token})
        assert ok.status_code == 200 and "whisperq_jobs" in ok.text
        # In production too: the token is the way in.
        with settings_override(environment="production", metrics_token=SecretStr(token)):
            assert api.get("/metrics").status_code == 401
            good = api.get("/metrics", headers={"Authorization": "Bearer " + token})
            assert good.status_code == 200


def test_metrics_without_a_token_is_off_in_production_only(api: TestClient) -> None:
    with settings_override(environment="production", metrics_token=None):
        off = api.get("/metrics")
        assert off.status_code == 404
        assert off.json() == api.get("/no-such-path").json()  # looks like any unknown path
    with settings_override(environment="production", metrics_token=SecretStr("")):
        assert api.get("/metrics").status_code == 404
    with settings_override(metrics_token=None):  # the test environment: open, as before
        assert api.get("/metrics").status_code == 200


# --- OpenAI's error shape for a too-large upload ----------------------------------------

TRANSCRIPTIONS = "/v1/audio/transcriptions"


def test_openai_client_gets_a_too_large_upload_in_openai_shape(api: TestClient) -> None:
    key = new_key("openai-413")
    client = openai.OpenAI(
        base_url=str(api.base_url) + "/v1", api_key=key.key, http_client=api, max_retries=0
    )
    with (
        settings_override(max_upload_bytes=1000, upload_overhead_bytes=100),
        pytest.raises(openai.BadRequestError) as err,
    ):
        client.audio.transcriptions.create(model="whisper-1", file=("a.wav", b"\0" * 5000))
    # Answered as OpenAI answers an invalid request (400), with the error's own code.
    assert err.value.status_code == 400
    assert err.value.code == "audio_too_large" and err.value.type == "invalid_request_error"
    assert "over the 1000 byte upload limit" in err.value.message
    assert isinstance(err.value.body, dict) and set(err.value.body) == {
        "message",
        "type",
        "param",
        "code",
    }


def test_too_large_upload_shapes_on_the_raw_routes(api: TestClient) -> None:
    key = new_key("raw-413")
    headers = {"Authorization": f"bearer {key.key}"}
    files = {"file": ("a.wav", b"\0" * 5000)}
    with settings_override(max_upload_bytes=1000, upload_overhead_bytes=100):
        declared = api.post(TRANSCRIPTIONS, headers=headers, files=files, data={"model": "x"})

        def chunks() -> Iterator[bytes]:  # no Content-Length: cut while reading
            yield b"--b\r\nContent-Disposition: form-data; name=file; filename=a.wav\r\n\r\n"
            for _ in range(10):
                yield b"\0" * 500

        streamed = api.post(
            TRANSCRIPTIONS,
            headers={**headers, "Content-Type": "multipart/form-data; boundary=b"},
            content=chunks(),
        )
        native = api.post("/v1/inference/openai/whisper-tiny", headers=headers, files=files)
    for r in (declared, streamed):
        assert r.status_code == 400, r.text
        assert r.headers["connection"] == "close"
        body = r.json()
        assert set(body) == {"error"}
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert body["error"]["code"] == "audio_too_large"
        assert body["error"]["type"] == "invalid_request_error"
    # The native route keeps its own shape and status.
    assert native.status_code == 413 and native.headers["connection"] == "close"
    assert native.json()["error"]["code"] == "audio_too_large"
    assert "type" not in native.json()["error"]
