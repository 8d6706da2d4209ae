"""ffprobe, hardened: is this decodable audio, and how long is it? (No torch here.)"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path


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
        reason = proc.stderr.decode(errors="replace").strip().splitlines()
        # ffprobe names the file it read: a server path, never for the caller's eyes.
        detail = (reason[-1] if reason else "ffprobe failed").replace(str(path), "input")
        raise AudioError("invalid_audio", f"not decodable audio: {detail}")
    info = json.loads(proc.stdout or b"{}")
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
