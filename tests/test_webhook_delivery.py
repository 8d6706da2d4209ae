"""Issue 4: webhooks a receiver can trust — signed, retried, recorded, safe — with a real
worker process delivering to a real local HTTP receiver."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from standardwebhooks import Webhook

from app.infra.db import session_scope
from app.infra.models import DeliveryStatus, Job, WebhookDelivery
from app.jobs.keys import CreatedKey, rotate_webhook_secret
from app.settings import get_settings
from tests.support.api import (
    INFER,
    auth,
    new_key,
    noise_wav,
    settings_override,
    wait_delivery,
    wait_job,
)
from tests.support.random_model import random_checkpoint
from tests.support.services import Receiver, WorkerProcess
from worker import deliveries

pytestmark = pytest.mark.integration

# Thresholds off: the random model decodes each window once, so jobs are quick.
FAST = {
    "compression_ratio_threshold": "none",
    "logprob_threshold": "none",
    "no_speech_threshold": "none",
}


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    tmp = tmp_path_factory.mktemp("hooks")
    proc = WorkerProcess(model=random_checkpoint(tmp / "random.pt"), log_path=tmp / "worker.log")
    yield proc
    proc.stop()


@pytest.fixture
def key() -> CreatedKey:
    return new_key("hooks")


def submit(api: TestClient, key: CreatedKey, webhook: str, **extra: str) -> str:
    r = api.post(
        INFER,
        headers=auth(key),
        files={"audio": ("n.wav", noise_wav(2.0))},
        data={"webhook": webhook, **FAST, **extra},
    )
    assert r.status_code == 202, r.text
    return str(r.json()["request_id"])


def answers(*steps: tuple[int, dict[str, str], float]) -> Any:
    """Respond with steps[n-1] to the n-th request, the last step ever after."""

    def respond(_req: Any, n: int) -> tuple[int, dict[str, str], float, bytes]:
        status, headers, stall = steps[min(n, len(steps)) - 1]
        return status, headers, stall, b"{}"

    return respond


def test_two_failures_then_success_is_one_event_in_three_attempts(
    api: TestClient, key: CreatedKey, worker: WorkerProcess, receiver: Receiver
) -> None:
    receiver.respond = answers((500, {}, 0), (503, {}, 0), (200, {}, 0))
    job_id = submit(api, key, receiver.url + "/hook")
    got = receiver.wait_for(3)
    assert len({g.headers["webhook-id"] for g in got}) == 1
    assert len({g.body for g in got}) == 1  # the same event, byte for byte
    for g in got:
        assert Webhook(key.webhook_secret).verify(g.body, g.headers)["request_id"] == job_id
    delivery = wait_delivery(api, key, job_id, status="delivered")
    assert delivery["id"] == got[0].headers["webhook-id"]
    assert [(a["attempt"], a["outcome"], a["status_code"]) for a in delivery["attempts"]] == [
        (1, "retry", 500),
        (2, "retry", 503),
        (3, "delivered", 200),
    ]
    assert delivery["attempts"][0]["next_attempt_at"] is not None
    assert all(a["latency_ms"] >= 0 for a in delivery["attempts"])
    listing = api.get(f"/v1/jobs/{job_id}/deliveries", headers=auth(key)).json()
    assert len(listing["deliveries"]) == 1


def test_410_stops_for_good(
    api: TestClient, key: CreatedKey, worker: WorkerProcess, receiver: Receiver
) -> None:
    receiver.respond = answers((410, {}, 0))
    job_id = submit(api, key, receiver.url + "/hook")
    delivery = wait_delivery(api, key, job_id, status="gone")
    assert [a["outcome"] for a in delivery["attempts"]] == ["gone"]
    # Retries would come every 0.5 s here; wait out several such periods.
    with pytest.raises(AssertionError):
        receiver.wait_for(2, timeout=3)
    assert len(receiver.requests) == 1


def test_a_hanging_receiver_is_cut_at_the_timeout_and_retried(
    api: TestClient, key: CreatedKey, worker: WorkerProcess, receiver: Receiver
) -> None:
    timeout_ms = get_settings().webhook_timeout_s * 1000
    receiver.respond = answers((200, {}, 8.0), (200, {}, 0))
    job_id = submit(api, key, receiver.url + "/hook")
    delivery = wait_delivery(api, key, job_id, status="delivered")
    first, second = delivery["attempts"]
    assert first["outcome"] == "retry" and "timeout" in first["error"].lower()
    assert timeout_ms * 0.9 <= first["latency_ms"] < timeout_ms + 1500
    assert second["outcome"] == "delivered"
    got = receiver.wait_for(2)
    assert got[0].headers["webhook-id"] == got[1].headers["webhook-id"]


def test_retry_after_is_honoured(
    api: TestClient, key: CreatedKey, worker: WorkerProcess, receiver: Receiver
) -> None:
    receiver.respond = answers((429, {"Retry-After": "3"}, 0), (200, {}, 0))
    job_id = submit(api, key, receiver.url + "/hook")
    delivery = wait_delivery(api, key, job_id, status="delivered")
    first = delivery["attempts"][0]
    from datetime import datetime

    gap = datetime.fromisoformat(first["next_attempt_at"]) - datetime.fromisoformat(first["at"])
    assert gap.total_seconds() >= 3  # the schedule alone would have waited ~0.5 s


def test_exhausted_schedule_gives_up_and_records_every_attempt(
    api: TestClient, key: CreatedKey, worker: WorkerProcess, receiver: Receiver
) -> None:
    receiver.respond = answers((500, {}, 0))
    job_id = submit(api, key, receiver.url + "/hook")
    delivery = wait_delivery(api, key, job_id, status="failed")
    schedule = get_settings().webhook_retry_schedule_s
    assert [a["outcome"] for a in delivery["attempts"]] == ["retry"] * (len(schedule) + 1)
    assert delivery["attempts"][-1]["next_attempt_at"] is None
    # A manual retry sends the same event again, with a fresh schedule.
    receiver.respond = answers((200, {}, 0))
    r = api.post(f"/v1/jobs/{job_id}/deliveries/retry", headers=auth(key))
    assert r.status_code == 202
    delivery = wait_delivery(api, key, job_id, status="delivered")
    assert delivery["attempts"][-1]["attempt"] == len(schedule) + 2
    assert len({g.headers["webhook-id"] for g in receiver.requests}) == 1


def test_rotated_secret_signs_with_both(
    api: TestClient, key: CreatedKey, worker: WorkerProcess, receiver: Receiver
) -> None:
    with session_scope() as session:
        new_secret = rotate_webhook_secret(session, prefix=key.row.prefix)
    submit(api, key, receiver.url + "/hook")
    (got,) = receiver.wait_for(1)
    assert len(got.headers["webhook-signature"].split()) == 2
    for secret in (key.webhook_secret, new_secret):
        Webhook(secret).verify(got.body, got.headers)


def test_failed_job_payload_carries_the_error(
    api: TestClient, key: CreatedKey, worker: WorkerProcess, receiver: Receiver
) -> None:
    job_id = submit(api, key, receiver.url + "/hook", suppress_tokens="60000")
    (got,) = receiver.wait_for(1)
    payload = json.loads(got.body)
    assert payload["request_id"] == job_id
    assert payload["inference_status"]["status"] == "failed"
    assert payload["error"]["code"] == "invalid_option"
    assert "suppress_tokens" in payload["error"]["message"]
    assert wait_job(api, key, job_id)["status"] == "failed"


SSRF_TARGETS = [
    "http://127.0.0.1:9/hook",
    "http://10.0.0.1/hook",
    "http://169.254.169.254/latest/meta-data",
    "http://[::1]:9/hook",
    "http://[::ffff:127.0.0.1]/hook",
    "http://localhost:9/hook",
    "http://internal.example/hook",  # resolves to 10.1.2.3 below
]


@pytest.mark.parametrize("url", SSRF_TARGETS)
def test_private_webhook_targets_are_refused_at_submission(
    api: TestClient, key: CreatedKey, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = socket.getaddrinfo

    def fake_dns(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "internal.example":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.1.2.3", 80))]
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake_dns)
    with settings_override(webhook_allowlist=[]):
        r = api.post(
            INFER,
            headers=auth(key),
            files={"audio": ("n.wav", noise_wav(1.0))},
            data={"webhook": url},
        )
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == "webhook"
    assert r.json()["error"]["code"] == "webhook_forbidden_address"


def test_allow_list_opens_exact_targets(
    api: TestClient, key: CreatedKey, worker: WorkerProcess, receiver: Receiver
) -> None:
    with settings_override(webhook_allowlist=["127.0.0.0/8"]):
        submit(api, key, receiver.url + "/hook")
    receiver.wait_for(1)


def test_delivery_time_check_refuses_what_is_no_longer_allowed(
    api: TestClient, key: CreatedKey, receiver: Receiver
) -> None:
    """DNS (or the allow-list) can change between submission and delivery: the worker checks
    again and refuses, without sending a byte."""
    with session_scope() as session:
        job = Job(api_key_id=key.row.id, status="succeeded", queue="x", options={})
        session.add(job)
        session.flush()
        delivery = WebhookDelivery(job_id=job.id, url=receiver.url + "/hook", body="{}")
        session.add(delivery)
        session.flush()
        delivery_id = delivery.id
    strict = get_settings().model_copy(update={"webhook_allowlist": []})
    assert deliveries.attempt(delivery_id, settings=strict).delay_s is None
    with session_scope() as session:
        row = session.get(WebhookDelivery, delivery_id)
        assert row is not None and row.status == DeliveryStatus.refused
        assert row.attempt_rows[0].outcome == "refused"
    assert receiver.requests == []
