"""Issue 14: uploads are cut at the byte cap while they stream, chunked or not, with flat
memory and flat temporary disk, in a real uvicorn process on loopback.

The API's RSS is read from /proc/<pid>/status; its temporary disk use is the sum of the sizes
of the files it holds open under its own TMPDIR (spooled uploads are unlinked files, so a
directory listing would not see them).
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from app.jobs.keys import CreatedKey
from tests.support.api import INFER, new_key, noise_wav
from tests.support.services import ApiProcess

pytestmark = pytest.mark.integration

MIB = 1024 * 1024
CAP = 24 * MIB  # max_upload_bytes for this server; the body is cut past CAP + overhead
OVERHEAD = 256 * 1024
HUGE = 2 * 1024 * MIB  # the body offered: 2 GiB, generated lazily
TRIP = 64 * MIB  # a sampler stops the test long before a broken guard spools 2 GiB


@dataclass
class Api:
    server: ApiProcess
    tmpdir: Path

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        return self.server.proc

    @property
    def port(self) -> int:
        return self.server.port

    def _status(self, field: str) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise AssertionError(f"no {field}")

    def rss(self) -> int:
        return self._status("VmRSS")

    def peak_rss(self) -> int:
        """The kernel's high-water mark: catches peaks a sampler would miss."""
        return self._status("VmHWM")

    def reset_peak(self) -> None:
        Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")

    def temp_bytes(self) -> int:
        total = 0
        fd_dir = Path(f"/proc/{self.proc.pid}/fd")
        for fd in fd_dir.iterdir():
            try:
                if os.readlink(fd).startswith(str(self.tmpdir)):
                    total += fd.stat().st_size
            except OSError:
                continue  # closed meanwhile
        return total + sum(p.stat().st_size for p in self.tmpdir.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def api_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    tmp = tmp_path_factory.mktemp("uploads")
    tmpdir = tmp / "tmp"
    tmpdir.mkdir()
    env = {
        "TMPDIR": str(tmpdir),
        "WHISPERQ_MAX_UPLOAD_BYTES": str(CAP),
        "WHISPERQ_UPLOAD_OVERHEAD_BYTES": str(OVERHEAD),
        "WHISPERQ_SUBMIT_RATE_PER_MINUTE": "0",
        "WHISPERQ_SYNC_WAIT_S": "0",
    }
    server = ApiProcess(log_path=tmp / "api.log", env=env)
    api = Api(server, tmpdir)
    yield api
    server.stop()


@pytest.fixture(scope="module")
def key() -> CreatedKey:
    return new_key("hostile-uploads")


@dataclass
class Peaks:
    rss: int = 0
    temp: int = 0
    tripped: bool = False
    stop: threading.Event = field(default_factory=threading.Event)


def sample(api: Api, peaks: Peaks) -> None:
    while not peaks.stop.is_set():
        try:
            peaks.rss = max(peaks.rss, api.rss())
            peaks.temp = max(peaks.temp, api.temp_bytes())
        except (OSError, AssertionError):
            return
        if peaks.temp > TRIP:
            peaks.tripped = True
            return
        time.sleep(0.02)


def read_answer(s: socket.socket) -> bytes:
    """Everything the server says until it closes (a 413 ends with Connection: close)."""
    answer = b""
    try:
        while chunk := s.recv(65536):
            answer += chunk
    except OSError:
        pass  # reset after the answer: fine, the bytes read so far are kept
    return answer


def chunked_upload(port: int, key: CreatedKey, total: int, peaks: Peaks) -> tuple[int, bytes]:
    """Send a chunked multipart body of ``total`` bytes of audio part; returns (bytes sent,
    whatever the server answered)."""
    boundary = b"hostileboundary"
    head = (
        b"--" + boundary + b"\r\n"
        b'Content-Disposition: form-data; name="audio"; filename="big.wav"\r\n'
        b"Content-Type: audio/wav\r\n\r\n"
    )
    request = (
        f"POST {INFER} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: bearer {key.key}\r\n"
        "Transfer-Encoding: chunked\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary.decode()}\r\n\r\n"
    ).encode()
    chunk = b"\x00" * (256 * 1024)
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(request)
        try:
            s.sendall(b"%x\r\n%s\r\n" % (len(head), head))
            while sent < total and not peaks.tripped:
                s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
            s.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the server stopped reading and closed: what we want
        answer = read_answer(s)
    return sent, answer


def test_chunked_2gb_upload_is_cut_at_the_cap_with_flat_rss_and_tmp(
    api_server: Api, key: CreatedKey
) -> None:
    # Warm up (imports, DB pool) so the baseline is the steady state.
    warm = httpx.post(
        f"http://127.0.0.1:{api_server.port}{INFER}",
        headers={"Authorization": f"bearer {key.key}"},
        files={"audio": ("a.wav", noise_wav(0.5))},
        data={"webhook": "http://127.0.0.1:9/hook"},
        timeout=60,
    )
    assert warm.status_code == 202, warm.text
    baseline = api_server.rss()
    api_server.reset_peak()
    peaks = Peaks()
    sampler = threading.Thread(target=sample, args=(api_server, peaks), daemon=True)
    sampler.start()
    sent, answer = chunked_upload(api_server.port, key, HUGE, peaks)
    peaks.stop.set()
    sampler.join(5)

    assert not peaks.tripped, f"the API held {peaks.temp} bytes of temporary files"
    assert sent < TRIP, f"the API kept reading: {sent} bytes sent"
    assert peaks.temp <= CAP + OVERHEAD + MIB
    peak = max(peaks.rss, api_server.peak_rss())
    assert peak - baseline < 32 * MIB, (baseline, peak)
    if answer:  # the 413 may be lost to the reset of a connection closed mid-body
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert b"audio_too_large" in answer
    assert api_server.temp_bytes() == 0  # nothing left behind
    assert api_server.proc.poll() is None


def test_declared_oversized_body_is_refused_before_reading(
    api_server: Api, key: CreatedKey
) -> None:
    with socket.create_connection(("127.0.0.1", api_server.port), timeout=30) as s:
        s.sendall(
            (
                f"POST {INFER} HTTP/1.1\r\nHost: x\r\nAuthorization: bearer {key.key}\r\n"
                f"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: {HUGE}\r\n\r\n"
            ).encode()
        )
        answer = read_answer(s)
    assert answer.startswith(b"HTTP/1.1 413") and b"audio_too_large" in answer


def test_parallel_uploads_under_the_cap_do_not_grow_memory(
    api_server: Api, key: CreatedKey
) -> None:
    """Uploads just under the cap are copied to the blob store in chunks, never read whole:
    four at once move RSS by far less than their total size."""
    body = b"\x00" * (CAP - 4096)  # not audio: refused after it is stored and probed
    results: list[int] = []

    def one() -> None:
        r = httpx.post(
            f"http://127.0.0.1:{api_server.port}{INFER}",
            headers={"Authorization": f"bearer {key.key}"},
            files={"audio": ("a.wav", body)},
            timeout=60,
        )
        results.append(r.status_code)

    one()  # warm-up: the probe path, worker threads
    baseline = api_server.rss()
    api_server.reset_peak()
    peaks = Peaks()
    sampler = threading.Thread(target=sample, args=(api_server, peaks), daemon=True)
    sampler.start()
    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    peaks.stop.set()
    sampler.join(5)
    assert results == [400] * 5
    # Read whole, four bodies would add 4 x 24 MiB (twice that with copies).
    peak = max(peaks.rss, api_server.peak_rss())
    assert peak - baseline < 2 * CAP, (baseline, peak)
