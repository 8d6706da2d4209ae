"""Issue 14: hostile audio through the real API and a real worker process.

Every file ends in a clear 4xx (refused at submission, or the sync answer of a job that failed
with a reason) or a succeeded job; never a 5xx, a hang or a server path in a message. The
duration limit is the *decoded* length: a FLAC whose header lies is refused or metered by
what it really holds.
"""

from __future__ import annotations

import io
import struct
import subprocess
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.jobs.keys import CreatedKey
from app.settings import get_settings
from tests.support.api import INFER, auth, new_key, noise_wav, settings_override
from tests.support.random_model import random_checkpoint
from tests.support.services import WorkerProcess

pytestmark = pytest.mark.integration

MAX_AUDIO_S = 10.0  # the API's and the worker's limit in this module
FAST = {
    "compression_ratio_threshold": "none",
    "logprob_threshold": "none",
    "no_speech_threshold": "none",
}


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    tmp = tmp_path_factory.mktemp("hostile-audio")
    proc = WorkerProcess(
        model=random_checkpoint(tmp / "random.pt"),
        log_path=tmp / "worker.log",
        env={"WHISPERQ_MAX_AUDIO_SECONDS": str(MAX_AUDIO_S)},
    )
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def key() -> CreatedKey:
    return new_key("hostile-audio")


def ffmpeg(*args: str) -> bytes:
    # To a seekable file, so that headers (FLAC's total samples) are filled in as usual.
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        cmd = ["ffmpeg", "-nostdin", "-v", "error", *args, str(out)]
        subprocess.run(cmd, capture_output=True, check=True, timeout=60)
        return out.read_bytes()


def flac(seconds: float, *, claim_samples: int | None = None, silent: bool = False) -> bytes:
    """A 16 kHz mono FLAC; ``claim_samples`` rewrites STREAMINFO's total-samples field."""
    source = (
        f"anullsrc=r=16000:cl=mono:d={seconds}"
        if silent
        else f"anoisesrc=r=16000:a=0.1:d={seconds}"
    )
    data = bytearray(ffmpeg("-f", "lavfi", "-i", source, "-ac", "1", "-c:a", "flac", "-f", "flac"))
    if claim_samples is not None:
        assert data[:4] == b"fLaC" and data[4] & 0x7F == 0  # STREAMINFO comes first
        # STREAMINFO starts at byte 8; total samples is its low 36 bits of bytes 10..18.
        field = int.from_bytes(data[18:26], "big")
        field = (field & ~((1 << 36) - 1)) | claim_samples
        data[18:26] = field.to_bytes(8, "big")
    return bytes(data)


def many_channels() -> bytes:
    return ffmpeg(
        "-f",
        "lavfi",
        "-i",
        "anoisesrc=r=16000:a=0.1:d=1",
        "-af",
        "aformat=channel_layouts=hexadecagonal",
        "-f",
        "wav",
    )


def huge_sample_rate() -> bytes:
    rate, data = 2**31 - 1, b"\x01\x00" * 16_000
    fmt = struct.pack("<IHHIIHH", 16, 1, 1, rate, (rate * 2) & 0xFFFFFFFF, 2, 16)
    return (
        b"RIFF"
        + struct.pack("<I", 36 + len(data))
        + b"WAVEfmt "
        + fmt
        + b"data"
        + (struct.pack("<I", len(data)) + data)
    )


def png() -> bytes:
    return (
        b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00"
        b"\x00\x1f\x15\xc4\x89\x00\x00\x00\rIDATx\x9cc\xf8\x0f\x00\x00\x01\x01\x00\x05\x18\xd8N"
        b"\x00\x00\x00\x00IEND\xaeB`\x82"
    )


def zip_of_wav() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("speech.wav", noise_wav(1.0))
    return buf.getvalue()


def playlist() -> bytes:
    # A playlist naming a local file (another tenant's blob, say): never a format we open.
    target = Path(get_settings().blob_dir).resolve() / "someoneelse"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(noise_wav(1.0))
    return f"#EXTM3U\n#EXTINF:1,\n{target}\n#EXT-X-ENDLIST\n".encode()


def concat_list() -> bytes:
    return b"ffconcat version 1.0\nfile 'someoneelse'\n"


CORPUS: list[tuple[str, Callable[[], bytes], set[int]]] = [
    ("zero-length", lambda: b"", {400}),
    ("truncated wav header", lambda: noise_wav(1.0)[:30], {400}),
    ("truncated wav data", lambda: noise_wav(2.0)[:8000], {200, 400, 422}),
    ("truncated flac", lambda: flac(2.0)[:3000], {200, 400, 422}),
    ("png", png, {400}),
    ("zip", zip_of_wav, {400}),
    ("text", lambda: b"hello, this is not audio\n" * 100, {400}),
    ("many channels", many_channels, {200, 400, 422}),
    ("huge sample rate", huge_sample_rate, {400, 422}),
    ("hls playlist of a local file", playlist, {400}),
    ("ffconcat list of a sibling blob", concat_list, {400}),
    ("silent bomb, honest header", lambda: flac(600, silent=True), {413}),
]


def submit(api: TestClient, key: CreatedKey, data: bytes) -> tuple[int, dict[str, object]]:
    with settings_override(max_audio_seconds=MAX_AUDIO_S):
        r = api.post(INFER, headers=auth(key), files={"audio": ("a", data)}, data=FAST)
    return r.status_code, r.json()


def assert_no_server_detail(body: dict[str, object]) -> None:
    text = str(body)
    blob_dir = str(Path(get_settings().blob_dir).resolve())
    for leak in (blob_dir, "/tmp", "whisperq-", "ffmpeg", "ffprobe", "Traceback"):
        assert leak not in text, f"{leak!r} in {text}"


@pytest.mark.parametrize(("name", "make", "allowed"), CORPUS, ids=[name for name, _m, _a in CORPUS])
def test_hostile_audio_is_a_clear_4xx_or_a_result(
    api: TestClient,
    key: CreatedKey,
    worker: WorkerProcess,
    name: str,
    make: Callable[[], bytes],
    allowed: set[int],
) -> None:
    status, body = submit(api, key, make())
    assert status in allowed, (name, status, body)
    if status >= 400:
        error = body["error"]
        assert isinstance(error, dict) and error["code"] and error["message"]
        assert_no_server_detail(body)
    else:
        assert body["inference_status"]["status"] == "succeeded"  # type: ignore[index]


def test_lying_flac_header_is_refused_by_its_decoded_length(
    api: TestClient, key: CreatedKey, worker: WorkerProcess
) -> None:
    """20 s of audio whose header claims 1 s: accepted on its header, then failed by the
    worker on the decoded length, before the engine."""
    status, body = submit(api, key, flac(20.0, claim_samples=16_000))
    assert status == 422, body
    assert body["error"]["code"] == "audio_too_long"  # type: ignore[index]
    assert body["inference_status"]["runtime_ms"] == 0  # type: ignore[index]
    assert_no_server_detail(body)


def test_lying_flac_under_the_limit_is_metered_by_its_decoded_length(
    api: TestClient, key: CreatedKey, worker: WorkerProcess
) -> None:
    status, body = submit(api, key, flac(3.0, claim_samples=16_000))
    assert status == 200, body
    assert body["input_length_ms"] == 3000  # not the header's 1000
