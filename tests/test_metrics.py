"""After a few jobs, the API's and the worker's /metrics parse with prometheus-client's own
parser and say what the database says; /healthz and /readyz answer on both."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from app.infra.db import session_scope, utcnow
from app.infra.models import Job, WebhookAttempt, WebhookDelivery
from tests.support.api import INFER, auth, new_key, noise_wav, wait_delivery, wait_job
from tests.support.random_model import random_checkpoint
from tests.support.seaweed import free_port
from tests.support.services import Receiver, WorkerProcess

pytestmark = pytest.mark.integration
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(samples: Samples, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= set(lab))


@pytest.fixture(scope="module")
def metered_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[WorkerProcess, int]]:
    tmp = tmp_path_factory.mktemp("metrics")
    port = free_port()
    proc = WorkerProcess(
        model=random_checkpoint(tmp / "random.pt"),
        log_path=tmp / "worker.log",
        env={
            "WHISPERQ_WORKER_METRICS_PORT": str(port),
            "WHISPERQ_WORKER_METRICS_HOST": "127.0.0.1",
            "WHISPERQ_LOG_FORMAT": "json",
        },
    )
    yield proc, port
    proc.stop()


def test_metrics_equal_the_database(
    api: TestClient, metered_worker: tuple[WorkerProcess, int], receiver: Receiver
) -> None:
    worker, port = metered_worker
    since: datetime = utcnow()
    key = new_key("metrics")
    ids = []
    for seed, seconds in ((1, 1.0), (2, 2.5)):
        r = api.post(
            INFER, headers=auth(key), files={"audio": ("a.wav", noise_wav(seconds, seed=seed))}
        )
        assert r.status_code == 200, r.text
        ids.append(r.json()["request_id"])
    # A job the engine refuses (a token id outside the vocabulary): failed, counted as such.
    r = api.post(
        INFER,
        headers=auth(key),
        files={"audio": ("a.wav", noise_wav(1.0))},
        data={"suppress_tokens": "99999", "webhook": receiver.url + "/hook"},
    )
    assert r.status_code == 202
    bad = r.json()["request_id"]
    assert wait_job(api, key, bad)["status"] == "failed"
    wait_delivery(api, key, bad, status="delivered")

    worker_text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    w = scrape(worker_text)
    with session_scope() as session:
        finished = session.execute(
            select(
                Job.status,
                Job.queue,
                func.count(),
                func.sum(Job.input_length_ms),
                func.sum(Job.runtime_ms),
            )
            .where(Job.finished_at >= since)
            .group_by(Job.status, Job.queue)
        ).all()
        attempts = dict(
            session.execute(
                select(WebhookAttempt.outcome, func.count())
                .join(WebhookDelivery, WebhookDelivery.id == WebhookAttempt.delivery_id)
                .join(Job, Job.id == WebhookDelivery.job_id)
                .where(Job.finished_at >= since)
                .group_by(WebhookAttempt.outcome)
            ).all()
        )
    assert {row[0] for row in finished} == {"succeeded", "failed"}
    for status, queue, count, audio_ms, runtime_ms in finished:
        assert total(w, "whisperq_worker_jobs_total", status=status, queue=queue) == count
        if status == "succeeded":
            assert total(w, "whisperq_audio_seconds_processed_total", queue=queue) == pytest.approx(
                audio_ms / 1000
            )
            assert total(w, "whisperq_model_seconds_count", queue=queue) == count
            assert total(w, "whisperq_model_seconds_sum", queue=queue) == pytest.approx(
                runtime_ms / 1000
            )
            assert total(w, "whisperq_real_time_factor_count") == count
    assert total(w, "whisperq_queue_wait_seconds_count") == sum(row[2] for row in finished)
    assert attempts == {"delivered": 1}
    for outcome, count in attempts.items():
        assert total(w, "whisperq_webhook_attempts_total", outcome=outcome) == count
    assert total(w, "whisperq_worker_model_loaded") == 1
    # Every succeeded job's windows went through at least one batched decode pass.
    succeeded = sum(row[2] for row in finished if row[0] == "succeeded")
    assert total(w, "whisperq_engine_batch_size_count") >= succeeded
    assert total(w, "whisperq_engine_batch_size_sum") >= total(
        w, "whisperq_engine_batch_size_count"
    )

    # JSON logs: the job's request_id on the worker's lines and on each webhook attempt;
    # never the key, the webhook secret or transcript text.
    lines = [json.loads(line) for line in worker.log().splitlines() if line.startswith("{")]
    events = {(e.get("event"), e.get("request_id")) for e in lines}
    assert ("job_finished", bad) in events and ("webhook_attempt", bad) in events
    assert all(e["request_id"] == ids[0] for e in lines if ids[0] in e["msg"])
    with session_scope() as session:
        texts = [session.get(Job, i).result["text"] for i in ids]  # type: ignore[union-attr]
    raw = worker.log()
    assert key.key not in raw and key.webhook_secret not in raw
    assert not [t for t in texts if len(t.strip()) > 8 and t.strip() in raw]

    # The API reports jobs by state and queue straight from the database, and queue depth.
    a = scrape(api.get("/metrics").text)
    with session_scope() as session:
        by_state = session.execute(
            select(Job.status, Job.queue, func.count()).group_by(Job.status, Job.queue)
        ).all()
    for status, queue, count in by_state:
        assert total(a, "whisperq_jobs", state=status, queue=queue) == count
    assert total(a, "whisperq_jobs") == sum(row[2] for row in by_state)
    assert any(name == "whisperq_queue_depth" for name, _ in a)


def test_health_and_readiness(api: TestClient, metered_worker: tuple[WorkerProcess, int]) -> None:
    _, port = metered_worker
    assert api.get("/healthz").json() == {"ok": True}
    ready = api.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"database": "ok", "redis": "ok"}
    base = f"http://127.0.0.1:{port}"
    assert httpx.get(base + "/healthz", timeout=10).json() == {"ok": True}
    wr = httpx.get(base + "/readyz", timeout=10)
    assert wr.status_code == 200
    assert wr.json()["checks"] == {"model": "ok", "database": "ok", "redis": "ok"}


def test_api_readyz_says_which_dependency_is_down(tmp_path: Path) -> None:
    from app.api.ops import readiness
    from app.settings import get_settings

    dead = get_settings().model_copy(update={"redis_url": "redis://127.0.0.1:9/0"})
    ready = readiness(dead)
    assert not ready.ok and ready.checks["database"] == "ok"
    assert ready.checks["redis"].startswith("unreachable")


def test_docs_are_served_offline(api: TestClient) -> None:
    page = api.get("/docs").text
    assert "cdn." not in page and "/static/swagger/swagger-ui-bundle.js" in page
    js = api.get("/static/swagger/swagger-ui-bundle.js")
    assert js.status_code == 200 and len(js.content) > 100_000


def test_api_logs_carry_the_request_id_and_mask_secrets(
    api: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    import io
    import logging

    from app.infra.logging import JsonFormatter, RequestIdFilter, mask

    key = new_key("logs")
    with caplog.at_level("INFO"):
        r = api.post(
            INFER,
            headers={**auth(key), "X-Request-ID": "trace-123"},
            files={"audio": ("a.wav", noise_wav(0.5))},
            data={"webhook": "http://127.0.0.1:9/x"},
        )
    assert r.status_code == 202 and r.headers["x-request-id"] == "trace-123"
    job_id = r.json()["request_id"]
    accepted = [rec for rec in caplog.records if rec.getMessage() == "job accepted"]
    assert [getattr(rec, "request_id", None) for rec in accepted] == [job_id]
    access = [rec for rec in caplog.records if getattr(rec, "event", "") == "http_request"]
    assert access and getattr(access[-1], "request_id", None) == "trace-123"
    assert all(key.key not in rec.getMessage() for rec in caplog.records)

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("whisperq.test-json")
    logger.addHandler(handler)
    try:
        logger.warning("presented %s and %s", key.key, key.webhook_secret, extra={"n": 3})
    finally:
        logger.removeHandler(handler)
    line = json.loads(stream.getvalue())
    assert key.key not in line["msg"] and key.webhook_secret not in line["msg"]
    assert line["msg"].count("[redacted]") == 2 and line["n"] == 3 and line["level"] == "warning"
    assert mask("Authorization: Bearer abc.def") == "Authorization: [redacted]"
