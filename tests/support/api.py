"""Driving the API in-process, as a client would, plus small helpers shared by tests."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import jiwer
from fastapi.testclient import TestClient

from app.api.main import app
from app.infra.db import session_scope
from app.jobs.keys import CreatedKey, create_key
from app.settings import Settings, get_settings

INFER = "/v1/inference/openai/whisper-tiny"


def new_key(name: str = "test") -> CreatedKey:
    with session_scope() as session:
        return create_key(session, name=name, pepper=get_settings().key_pepper)


def auth(key: CreatedKey) -> dict[str, str]:
    return {"Authorization": f"bearer {key.key}"}


@contextmanager
def settings_override(**changes: Any) -> Iterator[Settings]:
    patched = get_settings().model_copy(update=changes)
    app.dependency_overrides[get_settings] = lambda: patched
    try:
        yield patched
    finally:
        app.dependency_overrides.pop(get_settings, None)


def client() -> TestClient:
    return TestClient(app, raise_server_exceptions=True)


def normalise(text: str) -> str:
    return re.sub(r"[^a-z0-9' ]+", " ", text.lower()).strip()


def wer(reference: str, hypothesis: str) -> float:
    return float(jiwer.wer(normalise(reference), normalise(hypothesis)))


def wait_job(c: TestClient, key: CreatedKey, job_id: str, *, timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = c.get(f"/v1/jobs/{job_id}", headers=auth(key)).json()
        if body["status"] in ("succeeded", "failed", "canceled"):
            return body
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish in {timeout}s")


def noise_wav(seconds: float, *, seed: int = 0) -> bytes:
    """A 16 kHz mono WAV of quiet noise: enough for a random model to decode something."""
    import io
    import wave

    import numpy as np

    rng = np.random.default_rng(seed)
    samples = (rng.standard_normal(int(seconds * 16_000)) * 3000).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16_000)
        w.writeframes(samples.tobytes())
    return buf.getvalue()


def wait_delivery(
    c: TestClient, key: CreatedKey, job_id: str, *, status: str, timeout: float = 60
) -> Any:
    deadline = time.monotonic() + timeout
    body: Any = None
    while time.monotonic() < deadline:
        body = c.get(f"/v1/jobs/{job_id}/deliveries", headers=auth(key)).json()
        if body["deliveries"] and body["deliveries"][-1]["status"] == status:
            return body["deliveries"][-1]
        time.sleep(0.2)
    raise AssertionError(f"delivery of {job_id} never reached {status!r}: {body}")
