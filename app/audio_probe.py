"""ffprobe, hardened: is this decodable audio, and how long is it? (No torch here.)"""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path

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


def probe_duration_s(path: Path, *, timeout_s: float = 30.0) -> float:
    """Duration of the first audio stream; AudioError when there is none or ffprobe fails."""
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
