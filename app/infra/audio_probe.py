"""ffprobe, hardened: is this decodable audio, and how long is it? (No torch here.)"""

from __future__ import annotations

import json
import logging
import os
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger(__name__)

# The demuxers ffprobe/ffmpeg may use on a caller's file (issue 14). Playlists and
# references (hls, concat, ...) are not audio and would make ffmpeg read other local files,
# e.g. another tenant's blob, so only self-contained audio containers are listed.
DEMUXER_WHITELIST = ",".join(
    [
        "wav",
        "w64",
        "flac",
        "mp3",
        "ogg",
        "mov",
        "mp4",
        "m4a",
        "3gp",
        "matroska",
        "webm",
        "aac",
        "aiff",
        "caf",
        "amr",
        "au",
        "wv",
        "ape",
        "tta",
        "asf",
        "avi",
        "flv",
        "mpeg",
        "mpegts",
    ]
)


class AudioError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# A plain PCM/float WAV is the commonest upload; reading its header in-process saves an
# ffprobe process (~110 ms of API CPU per submission, most of the API's work). Only headers
# this strict reader fully understands take the fast path; anything else goes to ffprobe.
_WAV_FORMATS = {1: (8, 16, 24, 32), 3: (32, 64)}  # PCM, IEEE float: allowed bit depths
_WAVE_FORMAT_EXTENSIBLE = 0xFFFE
_WAV_MAX_CHUNKS = 64  # a header with more chunks before "data" is left to ffprobe


@dataclass(frozen=True)
class WavLayout:
    """What a strict reading of a WAV header found: its format and where its samples are."""

    tag: int  # 1 PCM, 3 IEEE float (an extensible header's sub-format)
    channels: int
    rate: int
    bits: int
    byte_rate: int
    data_offset: int
    data_size: int  # as declared: the file may end sooner
    file_size: int


def wav_layout(path: Path) -> WavLayout | None:
    """The layout of a well-formed PCM or float WAV, up to its data chunk; None when unsure
    (then ffprobe and ffmpeg judge the file)."""
    try:
        with path.open("rb") as f:
            return wav_layout_of(f)
    except OSError:
        return None


def wav_layout_of(f: BinaryIO) -> WavLayout | None:
    """:func:`wav_layout` of an open file, read from its start (the caller goes on reading
    the samples through the same handle: one open per job)."""
    try:
        size = os.fstat(f.fileno()).st_size
        f.seek(0)
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        fmt: tuple[int, int, int, int, int] | None = None
        pos = 12
        for _ in range(_WAV_MAX_CHUNKS):
            hdr = f.read(8)
            if len(hdr) < 8:
                return None
            cid, clen = hdr[:4], struct.unpack("<I", hdr[4:])[0]
            pos += 8
            if cid == b"fmt ":
                if not 16 <= clen <= 64:
                    return None
                body = f.read(clen + (clen & 1))
                if len(body) < clen:
                    return None
                tag, channels, rate, byte_rate, align, bits = struct.unpack("<HHIIHH", body[:16])
                if tag == _WAVE_FORMAT_EXTENSIBLE:
                    if clen < 40:
                        return None
                    tag = struct.unpack("<H", body[24:26])[0]  # the sub-format GUID's tag
                fmt = (tag, channels, rate, byte_rate, bits)
                if not (
                    bits in _WAV_FORMATS.get(tag, ())
                    and 1 <= channels <= 8
                    and 8000 <= rate <= 384000
                    and align == channels * bits // 8
                    and byte_rate == rate * align
                ):
                    return None
            elif cid == b"data":
                if fmt is None:
                    return None
                tag, channels, rate, byte_rate, bits = fmt
                return WavLayout(tag, channels, rate, bits, byte_rate, pos, clen, size)
            else:
                f.seek(clen + (clen & 1), 1)
            pos += clen + (clen & 1)
        return None
    except (OSError, struct.error):
        return None


def wav_duration_s(path: Path) -> float | None:
    """Duration of a well-formed PCM or float WAV from its header; None when unsure."""
    layout = wav_layout(path)
    # ffprobe would report a truncated or empty body differently: let it.
    if layout is None or layout.data_size == 0:
        return None
    if layout.data_offset + layout.data_size > layout.file_size:
        return None
    return float(layout.data_size / layout.byte_rate)


def probe_duration_s(path: Path, *, timeout_s: float = 30.0) -> float:
    """Duration of the first audio stream; AudioError when there is none or ffprobe fails."""
    fast = wav_duration_s(path)
    if fast is not None:
        return fast
    cmd = [
        "ffprobe",
        "-v",
        "error",
        "-protocol_whitelist",
        "file",
        "-format_whitelist",
        DEMUXER_WHITELIST,
        "-select_streams",
        "a:0",
        "-show_entries",
        "stream=codec_type,duration:format=duration",
        "-of",
        "json",
        str(path),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=timeout_s, check=False)
    except FileNotFoundError:
        raise AudioError("ffmpeg_missing", "ffprobe is not installed on this server") from None
    except subprocess.TimeoutExpired:
        raise AudioError("invalid_audio", "probing the audio timed out") from None
    if proc.returncode != 0:
        # ffprobe's words name the server's file path: the log may have them, callers not.
        log.info("ffprobe failed: %s", proc.stderr.decode(errors="replace")[-500:])
        raise AudioError("invalid_audio", "the file is not audio in a supported format")
    try:
        info = json.loads(proc.stdout or b"{}")
    except ValueError:
        raise AudioError("invalid_audio", "the file is not audio in a supported format") from None
    streams = info.get("streams") or []
    if not streams:
        raise AudioError("invalid_audio", "the file has no audio stream")
    for raw in (streams[0].get("duration"), (info.get("format") or {}).get("duration")):
        try:
            if raw is not None and float(raw) > 0:
                return float(raw)
        except ValueError:
            continue
    raise AudioError("invalid_audio", "the audio stream has no duration (empty or truncated)")
