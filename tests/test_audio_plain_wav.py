"""The WAV read without ffmpeg (worker/audio.py ``read_plain_wav``): for the one layout it
takes (16 kHz mono s16le PCM) it returns exactly what ffmpeg decodes, under the same limits;
everything else is left to ffmpeg. Each case is checked against a real ffmpeg decode."""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

from app.infra.audio_probe import AudioError
from worker.audio import decode, read_plain_wav

RATE = 16_000


def pcm(seconds: float, *, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(int(seconds * RATE)) * 3000).astype("<i2").tobytes()


def wav(
    data: bytes,
    *,
    channels: int = 1,
    rate: int = RATE,
    bits: int = 16,
    tag: int = 1,
    declared: int | None = None,
    before_data: bytes = b"",
    after_data: bytes = b"",
    fmt_extra: bytes = b"",
) -> bytes:
    block = channels * bits // 8
    fmt = struct.pack("<HHIIHH", tag, channels, rate, rate * block, block, bits) + fmt_extra
    body = (
        b"WAVE"
        + b"fmt "
        + struct.pack("<I", len(fmt))
        + fmt
        + before_data
        + b"data"
        + struct.pack("<I", len(data) if declared is None else declared)
        + data
        + after_data
    )
    return b"RIFF" + struct.pack("<I", len(body)) + body


def chunk(name: bytes, payload: bytes) -> bytes:
    pad = b"\0" if len(payload) % 2 else b""
    return name + struct.pack("<I", len(payload)) + payload + pad


def both(path: Path, max_seconds: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    fast = read_plain_wav(path, max_seconds=max_seconds)
    assert fast is not None, "not read as a plain WAV"
    return fast, decode(path, timeout_s=60, max_seconds=max_seconds)


PLAIN = {
    "plain": lambda: wav(pcm(1.3)),
    # A LIST chunk of odd length (padded) before the data, as sox and many recorders write.
    "chunks before the data": lambda: wav(
        pcm(0.7, seed=1), before_data=chunk(b"LIST", b"INFOISFT\x05\x00\x00\x00sox!\x00")
    ),
    "metadata after the data": lambda: wav(pcm(0.5, seed=2), after_data=chunk(b"id3 ", b"x" * 9)),
    "a fmt chunk with cbSize": lambda: wav(pcm(0.4, seed=3), fmt_extra=b"\0\0"),
    "a data size past the end of the file": lambda: wav(pcm(0.6, seed=4), declared=0xFFFFFFF0),
    "an odd byte at the end": lambda: wav(pcm(0.3, seed=5) + b"\x07"),
}


@pytest.mark.parametrize("case", PLAIN)
def test_a_plain_wav_reads_as_ffmpeg_decodes_it(case: str, tmp_path: Path) -> None:
    path = tmp_path / "a.wav"
    path.write_bytes(PLAIN[case]())
    fast, slow = both(path)
    assert fast.dtype == slow.dtype == np.float32
    np.testing.assert_array_equal(fast, slow)


def test_a_data_chunk_shorter_than_the_file_stops_where_ffmpeg_stops(tmp_path: Path) -> None:
    """The header says 0.25 s and 1 s follows: both read what the data chunk declares."""
    data = pcm(1.0, seed=6)
    path = tmp_path / "a.wav"
    path.write_bytes(wav(data, declared=RATE // 2))  # bytes: 0.25 s of samples
    fast, slow = both(path)
    np.testing.assert_array_equal(fast, slow)


def test_the_limit_applies_to_what_is_read_not_to_the_header(tmp_path: Path) -> None:
    path = tmp_path / "long.wav"
    path.write_bytes(wav(pcm(3.0, seed=7), declared=RATE))  # claims 0.5 s of bytes...
    assert read_plain_wav(path, max_seconds=1.0) is not None  # ...and is read as that
    path.write_bytes(wav(pcm(3.0, seed=7), declared=0xFFFFFFF0))  # claims ~37 h, holds 3 s
    for read in (read_plain_wav, lambda p, **kw: decode(p, timeout_s=60, **kw)):
        with pytest.raises(AudioError) as refused:
            read(path, max_seconds=2.0)
        assert refused.value.code == "audio_too_long"
    exactly = tmp_path / "two.wav"
    exactly.write_bytes(wav(pcm(2.0, seed=8)))
    fast, slow = both(exactly, max_seconds=2.0)
    np.testing.assert_array_equal(fast, slow)


def test_no_samples_is_refused_like_ffmpeg_refuses_it(tmp_path: Path) -> None:
    path = tmp_path / "empty.wav"
    path.write_bytes(wav(b""))
    with pytest.raises(AudioError) as refused:
        read_plain_wav(path)
    assert refused.value.code == "invalid_audio"
    with pytest.raises(AudioError):
        decode(path, timeout_s=60)


OTHER = {
    "stereo": lambda: wav(pcm(0.5) * 2, channels=2),
    "44.1 kHz": lambda: wav(pcm(0.5), rate=44_100),
    "8-bit": lambda: wav(pcm(0.25), bits=8),
    "float": lambda: wav(pcm(0.5) * 2, bits=32, tag=3),
    "extensible": lambda: wav(pcm(0.5), tag=0xFFFE, fmt_extra=b"\x16\x00" + b"\0" * 22),
    "data before fmt": lambda: b"RIFF\x00\x00\x00\x00WAVE" + chunk(b"data", pcm(0.1)),
    "not RIFF": lambda: b"RIFX" + wav(pcm(0.1))[4:],
    "truncated header": lambda: wav(pcm(0.1))[:30],
}


@pytest.mark.parametrize("case", OTHER)
def test_anything_else_is_left_to_ffmpeg(case: str, tmp_path: Path) -> None:
    path = tmp_path / "other.wav"
    path.write_bytes(OTHER[case]())
    assert read_plain_wav(path) is None


def test_what_sox_writes_is_read_without_ffmpeg(tmp_path: Path) -> None:
    """A real tool's output, not only files made here."""
    path = tmp_path / "sox.wav"
    subprocess.run(
        [
            "sox",
            "-n",
            "-r",
            "16000",
            "-c",
            "1",
            "-b",
            "16",
            str(path),
            "synth",
            "0.8",
            "sine",
            "440",
            "vol",
            "0.3",
        ],
        check=True,
    )
    fast, slow = both(path)
    np.testing.assert_array_equal(fast, slow)
