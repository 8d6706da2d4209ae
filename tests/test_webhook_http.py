"""Webhook signing and single delivery attempts against a real local HTTP server."""

from __future__ import annotations

import base64
import json
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
import standardwebhooks

from app.infra.ssrf import AllowList
from app.infra.webhook_signing import new_webhook_secret, sign, signature_headers
from worker.webhook_http import (
    DEFAULT_SCHEDULE_S,
    USER_AGENT,
    AttemptResult,
    deliver_once,
    parse_retry_after,
    retry_delay,
)

LOCAL = AllowList.parse(["127.0.0.1"])
BODY = json.dumps({"type": "job.completed", "data": {"job_id": "j_123"}}).encode()


# ---------------------------------------------------------------------------- the server


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    base: str = ""
    requests: list[Received] = field(default_factory=list)
    connections: int = 0
    release: threading.Event = field(default_factory=threading.Event)


Route = Callable[["_Handler", Receiver], None]


def _respond(
    handler: BaseHTTPRequestHandler,
    status: int,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
) -> None:
    handler.send_response(status)
    for name, value in (headers or {}).items():
        handler.send_header(name, value)
    handler.send_header("Content-Length", str(len(body)))
    handler.send_header("Connection", "close")
    handler.end_headers()
    handler.wfile.write(body)


def _slow(handler: _Handler, receiver: Receiver) -> None:
    receiver.release.wait(5)  # set at teardown: the server never answers in time
    _respond(handler, 200, b"too late")


def _trickle(handler: _Handler, receiver: Receiver) -> None:
    # Accepts and sends a byte of the status line every 50 ms, never finishing.
    for byte in b"HTTP/1.1 200 OK\r\nX-Padding: " + b"a" * 200:
        if receiver.release.wait(0.05):
            return
        handler.wfile.write(bytes([byte]))


ROUTES: dict[str, Route] = {
    "/ok": lambda h, r: _respond(h, 200, b'{"ok": true}'),
    "/no-content": lambda h, r: _respond(h, 204),
    "/500": lambda h, r: _respond(h, 500, b"database\n is down"),
    "/400": lambda h, r: _respond(h, 400, b"bad"),
    "/429": lambda h, r: _respond(h, 429, b"slow down", {"Retry-After": "7"}),
    "/503-date": lambda h, r: _respond(
        h, 503, b"", {"Retry-After": format_datetime(datetime.now(UTC) + timedelta(seconds=120))}
    ),
    "/410": lambda h, r: _respond(h, 410, b"unsubscribed"),
    "/slow": _slow,
    "/trickle": _trickle,
    "/big-error": lambda h, r: _respond(h, 500, b"x" * 1_000_000),
    "/redirect-307": lambda h, r: _respond(h, 307, b"", {"Location": "/ok"}),
    "/redirect-303": lambda h, r: _respond(h, 303, b"", {"Location": f"{r.base}/ok"}),
    "/redirect-metadata": lambda h, r: _respond(
        h, 302, b"", {"Location": "http://169.254.169.254/latest/meta-data/"}
    ),
    "/redirect-loop": lambda h, r: _respond(h, 302, b"", {"Location": "/redirect-loop"}),
    "/redirect-nowhere": lambda h, r: _respond(h, 302, b""),
}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def do_POST(self) -> None:
        self._handle()

    def do_GET(self) -> None:
        self._handle()

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        receiver = self.server.receiver
        path = self.path.split("?", 1)[0]
        receiver.requests.append(
            Received(self.command, path, {k.lower(): v for k, v in self.headers.items()}, body)
        )
        route = ROUTES.get(path)
        if route is None:
            _respond(self, 404)
        else:
            route(self, receiver)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    receiver: Receiver

    def verify_request(self, request: Any, client_address: Any) -> bool:
        self.receiver.connections += 1
        return True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients that gave up (timeouts) make writes fail; that is expected here


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = _Server(("127.0.0.1", 0), _Handler)
    port = server.server_address[1]
    server.receiver = Receiver(base=f"http://127.0.0.1:{port}")
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02})
    thread.start()
    try:
        yield server.receiver
    finally:
        server.receiver.release.set()
        server.shutdown()
        server.server_close()
        thread.join(5)


def signed(body: bytes = BODY, secrets: tuple[str, ...] = ()) -> tuple[dict[str, str], str]:
    secret = secrets[0] if secrets else new_webhook_secret()
    headers = signature_headers(
        secrets or (secret,), msg_id="msg_test_1", timestamp=int(time.time()), body=body
    )
    return headers, secret


# -------------------------------------------------------------------------------- signing


def test_secret_format() -> None:
    secret = new_webhook_secret()
    assert secret.startswith("whsec_")
    assert len(base64.b64decode(secret.removeprefix("whsec_"), validate=True)) == 32
    assert new_webhook_secret() != secret


def test_sign_matches_reference_implementation() -> None:
    secret = new_webhook_secret()
    ts = 1_700_000_000
    ours = sign(secret, msg_id="msg_abc", timestamp=ts, body=BODY)
    theirs = standardwebhooks.Webhook(secret).sign(
        "msg_abc", datetime.fromtimestamp(ts, tz=UTC), BODY.decode()
    )
    assert ours == theirs
    # Published Standard Webhooks / Svix test vector.
    assert (
        sign(
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            msg_id="msg_p5jXN8AQM9LWM0D4loKWxJek",
            timestamp=1614265330,
            body=b'{"test": 2432232314}',
        )
        == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    )


def test_signature_headers_verify_with_standardwebhooks() -> None:
    secret = new_webhook_secret()
    headers = signature_headers([secret], msg_id="msg_1", timestamp=int(time.time()), body=BODY)
    assert headers["webhook-id"] == "msg_1"
    assert headers["content-type"] == "application/json"
    assert standardwebhooks.Webhook(secret).verify(BODY, headers) == json.loads(BODY)
    with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError):
        standardwebhooks.Webhook(secret).verify(BODY + b" ", headers)
    with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError):
        standardwebhooks.Webhook(new_webhook_secret()).verify(BODY, headers)


def test_signature_headers_during_rotation_verify_with_either_secret() -> None:
    old, new = new_webhook_secret(), new_webhook_secret()
    headers = signature_headers([old, new], msg_id="msg_2", timestamp=int(time.time()), body=BODY)
    assert len(headers["webhook-signature"].split(" ")) == 2
    for secret in (old, new):
        assert standardwebhooks.Webhook(secret).verify(BODY, headers) == json.loads(BODY)
    with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError):
        standardwebhooks.Webhook(new_webhook_secret()).verify(BODY, headers)


def test_signature_headers_need_a_secret() -> None:
    with pytest.raises(ValueError):
        signature_headers([], msg_id="m", timestamp=1, body=b"")
    with pytest.raises(ValueError):
        sign("whsec_not*base64", msg_id="m", timestamp=1, body=b"")


# ------------------------------------------------------------------------------- delivery


def test_delivered_and_signature_verifies(receiver: Receiver) -> None:
    headers, secret = signed()
    result = deliver_once(f"{receiver.base}/ok", BODY, headers, timeout_s=5, allow=LOCAL)
    assert result.outcome == "delivered", result
    assert result.status_code == 200
    assert result.error is None
    assert result.latency_ms >= 0
    (req,) = receiver.requests
    assert (req.method, req.body) == ("POST", BODY)
    assert req.headers["user-agent"] == USER_AGENT
    assert req.headers["content-type"] == "application/json"
    assert standardwebhooks.Webhook(secret).verify(req.body, req.headers) == json.loads(BODY)


def test_204_is_delivered(receiver: Receiver) -> None:
    result = deliver_once(f"{receiver.base}/no-content", BODY, {}, timeout_s=5, allow=LOCAL)
    assert (result.outcome, result.status_code) == ("delivered", 204)


@pytest.mark.parametrize("path", ["/500", "/400"])
def test_error_status_is_retried(receiver: Receiver, path: str) -> None:
    result = deliver_once(f"{receiver.base}{path}", BODY, {}, timeout_s=5, allow=LOCAL)
    assert result.outcome == "retry"
    assert result.status_code == int(path[1:])
    assert result.error is not None and result.error.startswith(f"HTTP {path[1:]}")
    assert result.retry_after_s is None


def test_error_excerpt_is_single_line_and_short(receiver: Receiver) -> None:
    result = deliver_once(f"{receiver.base}/500", BODY, {}, timeout_s=5, allow=LOCAL)
    assert result.error == "HTTP 500: database is down"
    result = deliver_once(f"{receiver.base}/big-error", BODY, {}, timeout_s=5, allow=LOCAL)
    assert result.outcome == "retry"
    assert result.error is not None and len(result.error) <= 500


def test_429_retry_after_seconds(receiver: Receiver) -> None:
    result = deliver_once(f"{receiver.base}/429", BODY, {}, timeout_s=5, allow=LOCAL)
    assert (result.outcome, result.status_code, result.retry_after_s) == ("retry", 429, 7)


def test_503_retry_after_http_date(receiver: Receiver) -> None:
    result = deliver_once(f"{receiver.base}/503-date", BODY, {}, timeout_s=5, allow=LOCAL)
    assert (result.outcome, result.status_code) == ("retry", 503)
    assert result.retry_after_s is not None and 100 < result.retry_after_s <= 120


def test_410_is_gone(receiver: Receiver) -> None:
    result = deliver_once(f"{receiver.base}/410", BODY, {}, timeout_s=5, allow=LOCAL)
    assert (result.outcome, result.status_code) == ("gone", 410)
    assert result.error == "HTTP 410: unsubscribed"


@pytest.mark.parametrize("path", ["/slow", "/trickle"])
def test_deadline_cuts_silent_and_trickling_receivers(receiver: Receiver, path: str) -> None:
    timeout_s = 0.5
    result = deliver_once(f"{receiver.base}{path}", BODY, {}, timeout_s=timeout_s, allow=LOCAL)
    assert result.outcome == "retry", result
    assert result.status_code is None
    assert result.error is not None and "timeout" in result.error
    assert result.latency_ms < (timeout_s + 1) * 1000


def test_connection_refused_is_retried() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = deliver_once(f"http://127.0.0.1:{port}/hook", BODY, {}, timeout_s=2, allow=LOCAL)
    assert result.outcome == "retry"
    assert result.status_code is None
    assert result.error is not None and result.error.startswith("connection error")


def test_307_redirect_followed_with_same_post(receiver: Receiver) -> None:
    headers, secret = signed()
    result = deliver_once(f"{receiver.base}/redirect-307", BODY, headers, timeout_s=5, allow=LOCAL)
    assert (result.outcome, result.status_code) == ("delivered", 200)
    assert [(r.method, r.path) for r in receiver.requests] == [
        ("POST", "/redirect-307"),
        ("POST", "/ok"),
    ]
    final = receiver.requests[-1]
    assert final.body == BODY
    assert standardwebhooks.Webhook(secret).verify(final.body, final.headers)


def test_303_redirect_reposts_the_body(receiver: Receiver) -> None:
    result = deliver_once(f"{receiver.base}/redirect-303", BODY, {}, timeout_s=5, allow=LOCAL)
    assert result.outcome == "delivered"
    assert [(r.method, r.path, r.body) for r in receiver.requests][-1] == ("POST", "/ok", BODY)


def test_redirect_to_metadata_service_refused(receiver: Receiver) -> None:
    result = deliver_once(f"{receiver.base}/redirect-metadata", BODY, {}, timeout_s=5, allow=LOCAL)
    assert result.outcome == "refused"
    assert result.status_code == 302
    assert result.error is not None and "forbidden_address" in result.error
    assert [r.path for r in receiver.requests] == ["/redirect-metadata"]


def test_redirect_loop_stops(receiver: Receiver) -> None:
    result = deliver_once(
        f"{receiver.base}/redirect-loop", BODY, {}, timeout_s=5, allow=LOCAL, max_redirects=2
    )
    assert (result.outcome, result.status_code) == ("retry", 302)
    assert result.error is not None and "too many redirects" in result.error
    assert len(receiver.requests) == 3


def test_redirect_without_location_is_retried(receiver: Receiver) -> None:
    result = deliver_once(f"{receiver.base}/redirect-nowhere", BODY, {}, timeout_s=5, allow=LOCAL)
    assert (result.outcome, result.status_code) == ("retry", 302)


def test_not_allow_listed_loopback_refused_before_connecting(receiver: Receiver) -> None:
    result = deliver_once(
        f"{receiver.base}/ok", BODY, {}, timeout_s=5, allow=AllowList.parse(["10.0.0.0/8"])
    )
    assert result.outcome == "refused"
    assert result.status_code is None
    assert result.error is not None and result.error.startswith("forbidden_address")
    time.sleep(0.05)
    assert receiver.connections == 0
    assert receiver.requests == []


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/", "http://user:pw@127.0.0.1/", "not a url"])
def test_invalid_url_refused(url: str) -> None:
    result = deliver_once(url, BODY, {}, timeout_s=1, allow=LOCAL)
    assert result.outcome == "refused"
    assert result.error is not None and result.error.startswith("invalid_url")


def test_connects_to_the_vetted_address_only(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DNS rebinding: the name is resolved once, by the SSRF check; the connection goes to
    that vetted address even though later answers point elsewhere."""
    real_getaddrinfo = socket.getaddrinfo
    lookups: list[str] = []

    def rebinding(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "hooks.test":
            lookups.append(host)
            answer = "127.0.0.1" if len(lookups) == 1 else "10.255.255.1"
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (answer, port))]
        return real_getaddrinfo(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    port = receiver.base.rsplit(":", 1)[1]
    result = deliver_once(f"http://hooks.test:{port}/ok", BODY, {}, timeout_s=5, allow=LOCAL)
    assert result.outcome == "delivered", result
    assert lookups == ["hooks.test"]
    assert receiver.requests[0].headers["host"] == f"hooks.test:{port}"


# ------------------------------------------------------------- injected client (no server)


def _mock_client(handler: Callable[[httpx.Request], httpx.Response]) -> httpx.Client:
    return httpx.Client(transport=httpx.MockTransport(handler))


def test_injected_client_redirect_chain_and_downgrade() -> None:
    seen: list[tuple[str, str, bytes]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.method, str(request.url), request.content))
        if request.url.path == "/start":
            return httpx.Response(308, headers={"Location": "https://93.184.216.35/next"})
        if request.url.path == "/next":
            return httpx.Response(301, headers={"Location": "/done"})
        if request.url.path == "/done":
            return httpx.Response(202)
        return httpx.Response(302, headers={"Location": "http://93.184.216.34/plain"})

    with _mock_client(handler) as client:
        result = deliver_once(
            "https://93.184.216.34/start", BODY, {}, timeout_s=5, allow=LOCAL, client=client
        )
        assert (result.outcome, result.status_code) == ("delivered", 202)
        assert seen == [
            ("POST", "https://93.184.216.34/start", BODY),
            ("POST", "https://93.184.216.35/next", BODY),
            ("POST", "https://93.184.216.35/done", BODY),
        ]
        downgrade = deliver_once(
            "https://93.184.216.34/other", BODY, {}, timeout_s=5, allow=LOCAL, client=client
        )
        assert downgrade.outcome == "refused"
        assert downgrade.error is not None and "https to http" in downgrade.error


def test_injected_client_is_still_ssrf_checked() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise AssertionError("must not be sent")

    with _mock_client(handler) as client:
        result = deliver_once(
            "http://169.254.169.254/", BODY, {}, timeout_s=5, allow=LOCAL, client=client
        )
    assert result.outcome == "refused"


# ---------------------------------------------------------------------------- retry policy


def test_retry_delay_follows_schedule_within_jitter() -> None:
    rng = random.Random(1234)
    for attempt_no, base in enumerate(DEFAULT_SCHEDULE_S, start=1):
        for _ in range(50):
            delay = retry_delay(attempt_no, retry_after_s=None, rng=rng)
            assert delay is not None
            assert base * 0.8 <= delay <= base * 1.2
    assert DEFAULT_SCHEDULE_S == (5, 300, 1800, 7200, 18000, 36000, 36000)
    assert sum(DEFAULT_SCHEDULE_S) == 99_305  # about 27.6 hours after the first attempt


def test_retry_delay_without_jitter_and_custom_schedule() -> None:
    schedule = (1.0, 2.0)
    assert retry_delay(1, schedule=schedule, retry_after_s=None, jitter=0) == 1.0
    assert retry_delay(2, schedule=schedule, retry_after_s=None, jitter=0) == 2.0
    assert retry_delay(3, schedule=schedule, retry_after_s=None, jitter=0) is None


def test_retry_delay_exhausted() -> None:
    assert retry_delay(len(DEFAULT_SCHEDULE_S) + 1, retry_after_s=None) is None
    assert retry_delay(100, retry_after_s=60) is None
    with pytest.raises(ValueError):
        retry_delay(0, retry_after_s=None)


def test_retry_after_raises_the_delay() -> None:
    rng = random.Random(5)
    assert retry_delay(1, retry_after_s=120, rng=rng) == 120
    delay = retry_delay(3, retry_after_s=7, rng=rng)  # schedule already longer
    assert delay is not None and 1800 * 0.8 <= delay <= 1800 * 1.2
    assert retry_delay(1, retry_after_s=10 * 86400, rng=rng) == 86400  # capped


def test_parse_retry_after() -> None:
    now = 1_700_000_000.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("") is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("7") == 7
    assert parse_retry_after(" 0 ") == 0
    assert parse_retry_after("999999999999999999") == 86400
    http_date = format_datetime(datetime.fromtimestamp(now + 90, tz=UTC), usegmt=True)
    assert parse_retry_after(http_date, now=now) == 90
    past = format_datetime(datetime.fromtimestamp(now - 90, tz=UTC), usegmt=True)
    assert parse_retry_after(past, now=now) == 0


def test_attempt_result_is_frozen() -> None:
    result = AttemptResult("delivered", 200, 3, None, None)
    with pytest.raises(AttributeError):
        result.outcome = "retry"  # type: ignore[misc]
