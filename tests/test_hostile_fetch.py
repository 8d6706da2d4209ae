"""Issue 14: audio URLs are fetched by the worker through the webhooks' guarded HTTP path.

Each test drives the worker's real code path (``load_job_audio``) against real sockets on
loopback. The resolver is the test's: ``socket.getaddrinfo`` is patched, which is what both
the SSRF check and any unpinned HTTP client would call.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from app.infra.audio_probe import AudioError
from app.settings import Settings, get_settings
from tests.support.api import noise_wav
from tests.support.services import Received, Receiver
from worker.audio import load_job_audio

PUBLIC_IP = "93.184.216.34"  # a public address: the SSRF check lets it through
CLIENT_CODES = {
    "audio_fetch_failed",
    "audio_too_large",
    "audio_url_forbidden_address",
    "audio_url_unresolvable_host",
}


def settings_for(**changes: Any) -> Settings:
    base = {"audio_fetch_timeout_s": 5.0, "max_url_redirects": 3}
    return get_settings().model_copy(update={**base, **changes})


class RawServer:
    """A loopback TCP server whose every connection is handled by ``handle(conn)``."""

    def __init__(self, handle: Callable[[socket.socket], None]) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._handle = handle
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(30)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                data += chunk
            with contextlib.suppress(OSError):  # the client gave up: expected
                self._handle(conn)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def resolver(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """Names the test answers itself: host -> the answers to give, one per lookup (the last
    one repeats). Also records every address a TCP connection is opened to."""
    answers: dict[str, list[str]] = {}
    real_getaddrinfo = socket.getaddrinfo
    real_connect = socket.create_connection
    connects: list[str] = []
    answers["__connects__"] = connects

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(host, str) and host in answers:
            queue = answers[host]
            ip = queue.pop(0) if len(queue) > 1 else queue[0]
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, int(port or 80)))]
        return real_getaddrinfo(host, port, *args, **kwargs)

    def create_connection(address: Any, *args: Any, **kwargs: Any) -> socket.socket:
        connects.append(str(address[0]))
        if address[0] == PUBLIC_IP:  # no internet here: the public host refuses at once
            raise ConnectionRefusedError("test: public address not reachable")
        return real_connect(address, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket, "create_connection", create_connection)
    return answers


def test_dns_rebinding_never_reaches_loopback(
    receiver: Receiver, resolver: dict[str, list[str]]
) -> None:
    """The name answers a public address to the check and 127.0.0.1 afterwards: the fetch
    connects to the vetted public address only, never to the loopback listener."""
    port = receiver.server.server_address[1]
    receiver.respond = lambda _r, _n: (200, {}, 0.0, noise_wav(1.0))
    resolver["rebind.example"] = [PUBLIC_IP, "127.0.0.1"]
    settings = settings_for(audio_url_allowlist=[])  # loopback NOT allowed
    with pytest.raises(AudioError) as err:
        load_job_audio(blob=None, url=f"http://rebind.example:{port}/a.wav", settings=settings)
    assert receiver.requests == []
    assert resolver["__connects__"] == [PUBLIC_IP]
    assert err.value.code == "audio_fetch_failed"


def test_redirect_to_a_rebinding_name_is_vetted_and_pinned_again(
    receiver: Receiver, resolver: dict[str, list[str]]
) -> None:
    """An allowed origin redirects to a name that rebinds: the hop is vetted and pinned."""
    port = receiver.server.server_address[1]
    resolver["hop.example"] = [PUBLIC_IP, "127.0.0.1"]
    receiver.respond = lambda r, _n: (
        (302, {"Location": f"http://hop.example:{port}/inner"}, 0.0, b"")
        if r.path == "/outer"
        else (200, {}, 0.0, b"INTERNAL SECRET")
    )
    settings = settings_for(audio_url_allowlist=["127.0.0.1"])
    with pytest.raises(AudioError) as err:
        load_job_audio(blob=None, url=f"http://127.0.0.1:{port}/outer", settings=settings)
    assert [r.path for r in receiver.requests] == ["/outer"]
    assert resolver["__connects__"] == ["127.0.0.1", PUBLIC_IP]
    assert err.value.code == "audio_fetch_failed"


def test_environment_proxies_are_ignored(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy = Receiver().start()
    try:
        for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
            monkeypatch.setenv(name, proxy.url)
        for name in ("NO_PROXY", "no_proxy"):
            monkeypatch.delenv(name, raising=False)
        receiver.respond = lambda _r, _n: (200, {}, 0.0, noise_wav(1.0))
        samples, length_ms = load_job_audio(
            blob=None, url=f"{receiver.url}/ok.wav", settings=settings_for()
        )
        assert length_ms == 1000 and len(samples) == 16_000
        assert proxy.requests == []
        assert [r.path for r in receiver.requests] == ["/ok.wav"]
    finally:
        proxy.stop()


def test_trickling_server_is_cut_by_the_overall_deadline() -> None:
    """One byte every 0.3 s never trips a per-read timeout; the overall deadline cuts it."""
    sent: list[int] = []

    def trickle(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 60\r\n\r\n")
        for _ in range(60):
            conn.sendall(b"x")
            sent.append(1)
            time.sleep(0.3)

    server = RawServer(trickle)
    try:
        with pytest.raises(AudioError) as err:
            load_job_audio(
                blob=None,
                url=f"http://127.0.0.1:{server.port}/slow",
                settings=settings_for(audio_fetch_timeout_s=1.0),
            )
        assert err.value.code == "audio_fetch_failed"
        assert "in time" in err.value.message
        assert len(sent) < 60
    finally:
        server.close()


def test_chunked_body_is_cut_at_the_size_cap_while_streaming() -> None:
    streamed: list[int] = []

    def endless(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"\0" * 65536
        for _ in range(20 * 16):  # 20 MiB offered, no Content-Length
            conn.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            streamed.append(len(chunk))
        conn.sendall(b"0\r\n\r\n")

    server = RawServer(endless)
    try:
        with pytest.raises(AudioError) as err:
            load_job_audio(
                blob=None,
                url=f"http://127.0.0.1:{server.port}/big",
                settings=settings_for(max_upload_bytes=1024 * 1024),
            )
        assert err.value.code == "audio_too_large"
    finally:
        server.close()


@pytest.mark.parametrize(
    "location",
    [
        "http:\\\\169.254.169.254\\",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1",
        "http://0x7f.1/",
        "//[::ffff:127.0.0.1]/x",
        "gopher://127.0.0.1:6379/_INFO",
        "http://user:pw@127.0.0.1/",
        "http://%31%32%37.0.0.1/",
    ],
)
def test_malformed_and_internal_redirects_fail_the_job_with_a_generic_reason(
    receiver: Receiver, location: str
) -> None:
    receiver.respond = lambda _r, _n: (302, {"Location": location}, 0.0, b"")
    with pytest.raises(AudioError) as err:
        load_job_audio(
            blob=None,
            url=f"{receiver.url}/start",
            settings=settings_for(audio_url_allowlist=["127.0.0.1"]),
        )
    assert err.value.code in CLIENT_CODES
    assert "169.254" not in err.value.message and "302" not in err.value.message
    assert len(receiver.requests) == 1  # the redirect target was never fetched


@pytest.mark.parametrize("status", [401, 404, 500, 503])
def test_internal_status_codes_are_not_reported(receiver: Receiver, status: int) -> None:
    """A caller must not learn what an internal host answered (no port scanner)."""

    def answer(_r: Received, _n: int) -> tuple[int, dict[str, str], float, bytes]:
        return status, {}, 0.0, b"/srv/internal/path"

    receiver.respond = answer
    with pytest.raises(AudioError) as err:
        load_job_audio(blob=None, url=f"{receiver.url}/x", settings=settings_for())
    assert err.value.code == "audio_fetch_failed"
    assert str(status) not in err.value.message and "/srv" not in err.value.message


def test_redirect_loop_stops(receiver: Receiver) -> None:
    receiver.respond = lambda r, n: (302, {"Location": f"/hop{n}"}, 0.0, b"")
    with pytest.raises(AudioError) as err:
        load_job_audio(blob=None, url=f"{receiver.url}/hop0", settings=settings_for())
    assert err.value.code == "audio_fetch_failed"
    assert len(receiver.requests) == 4  # the first request and max_url_redirects = 3 hops
