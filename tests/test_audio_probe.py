"""The in-process WAV header reader agrees with ffprobe, and declines whatever it is unsure of."""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import pytest

from app.infra import audio_probe
from app.infra.audio_probe import AudioError, probe_duration_s, wav_duration_s


def _ffprobe_only(path: Path) -> float:
    """ffprobe's answer with the fast path out of the way."""
    real = audio_probe.wav_duration_s
    audio_probe.wav_duration_s = lambda _p: None  # type: ignore[assignment]
    try:
        return probe_duration_s(path)
    finally:
        audio_probe.wav_duration_s = real


def _ffmpeg_wav(tmp: Path, name: str, *args: str) -> Path:
    out = tmp / name
    cmd = ["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "sine=frequency=440:duration=2.345"]
    subprocess.run([*cmd, *args, "-y", str(out)], check=True)
    return out


VARIANTS = {
    "s16_mono_16k": ("-ar", "16000", "-ac", "1", "-c:a", "pcm_s16le"),
    "u8_mono_8k": ("-ar", "8000", "-ac", "1", "-c:a", "pcm_u8"),
    "s24_stereo_44k": ("-ar", "44100", "-ac", "2", "-c:a", "pcm_s24le"),
    "s32_6ch_48k": ("-ar", "48000", "-ac", "6", "-c:a", "pcm_s32le"),  # WAVE_FORMAT_EXTENSIBLE
    "f32_mono_22k": ("-ar", "22050", "-ac", "1", "-c:a", "pcm_f32le"),
    "f64_stereo_16k": ("-ar", "16000", "-ac", "2", "-c:a", "pcm_f64le"),
    "with_list_chunk": ("-ar", "16000", "-metadata", "title=odd", "-c:a", "pcm_s16le"),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_fast_path_equals_ffprobe(tmp_path: Path, name: str) -> None:
    path = _ffmpeg_wav(tmp_path, f"{name}.wav", *VARIANTS[name])
    fast = wav_duration_s(path)
    assert fast is not None, "a plain PCM/float WAV should not need ffprobe"
    assert fast == pytest.approx(_ffprobe_only(path), abs=1e-3)


def _wav(
    fmt_tag: int, channels: int, rate: int, bits: int, data: bytes, extra: bytes = b""
) -> bytes:
    align = channels * bits // 8
    fmt = struct.pack("<HHIIHH", fmt_tag, channels, rate, rate * align, align, bits)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + extra
    body += b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


def test_odd_sized_chunk_before_data_is_padded(tmp_path: Path) -> None:
    junk = b"junk" + struct.pack("<I", 3) + b"abc\0"  # odd length, one pad byte
    path = tmp_path / "odd.wav"
    path.write_bytes(_wav(1, 1, 16000, 16, b"\0\0" * 16000, extra=junk))
    assert wav_duration_s(path) == pytest.approx(1.0)
    assert _ffprobe_only(path) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize(
    "blob",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"RIFF\x00\x00\x00\x00WAVE", id="header-only"),
        pytest.param(_wav(1, 1, 16000, 16, b"\0\0" * 100)[:-50], id="truncated-data"),
        pytest.param(_wav(1, 1, 16000, 16, b""), id="empty-data"),
        pytest.param(_wav(1, 1, 16000, 12, b"\0" * 300), id="odd-bit-depth"),
        pytest.param(_wav(2, 1, 16000, 4, b"\0" * 300), id="adpcm"),
        pytest.param(_wav(1, 0, 16000, 16, b"\0" * 300), id="zero-channels"),
        pytest.param(_wav(1, 1, 10, 16, b"\0" * 300), id="absurd-rate"),
        pytest.param(b"RIFF\x10\x00\x00\x00WAVEdata\x04\x00\x00\x00abcd", id="data-before-fmt"),
        pytest.param(b"ID3\x03" + b"\0" * 200, id="not-wav"),
    ],
)
def test_declines_what_it_does_not_fully_understand(tmp_path: Path, blob: bytes) -> None:
    path = tmp_path / "x.wav"
    path.write_bytes(blob)
    assert wav_duration_s(path) is None


def test_a_lying_header_still_goes_to_ffprobe_and_is_refused(tmp_path: Path) -> None:
    # The header claims an hour of audio; the body holds 100 bytes.
    wav = bytearray(_wav(1, 1, 16000, 16, b"\0" * 100))
    wav[40:44] = struct.pack("<I", 16000 * 2 * 3600)
    path = tmp_path / "liar.wav"
    path.write_bytes(bytes(wav))
    assert wav_duration_s(path) is None
    assert probe_duration_s(path) == pytest.approx(
        100 / 32000, abs=1e-4
    )  # the bytes, not the claim


def test_not_audio_is_still_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.wav"
    path.write_bytes(b"RIFF\x00\x00\x00\x00WAVE")
    with pytest.raises(AudioError):
        probe_duration_s(path)
