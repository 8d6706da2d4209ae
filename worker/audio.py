"""Getting a job's audio as 16 kHz float32: blob or URL, through a hardened ffmpeg."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import httpx
import numpy as np

from app import blobs
from app.audio_probe import AudioError, probe_duration_s
from app.settings import Settings
from app.ssrf import AllowList, UnsafeURLError, validate_webhook_url

SAMPLE_RATE = 16_000


def decode(path: Path, *, timeout_s: float) -> np.ndarray:
    """Decode with ffmpeg as openai-whisper does, but only local files and with a time limit."""
    cmd = [
        "ffmpeg",
        "-nostdin",
        "-hide_banner",
        "-loglevel",
        "error",
        "-protocol_whitelist",
        "file",
        "-threads",
        "0",
        "-i",
        str(path),
        "-vn",
        "-f",
        "s16le",
        "-ac",
        "1",
        "-acodec",
        "pcm_s16le",
        "-ar",
        str(SAMPLE_RATE),
        "-",
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise AudioError("invalid_audio", f"decoding took over {timeout_s:.0f} s") from None
    if proc.returncode != 0:
        lines = proc.stderr.decode(errors="replace").strip().splitlines()
        detail = (lines[-1] if lines else "failed").replace(str(path), "input")  # no server path
        raise AudioError("invalid_audio", f"ffmpeg: {detail}")
    samples = np.frombuffer(proc.stdout, np.int16).astype(np.float32) / 32768.0
    if samples.size == 0:
        raise AudioError("invalid_audio", "the audio decodes to no samples")
    return samples


def fetch_url(url: str, dest: Path, *, settings: Settings) -> None:
    """Download an audio URL, re-checking every hop against the SSRF guard."""
    allow = AllowList.parse(settings.audio_url_allowlist)
    limit = settings.max_upload_bytes
    with httpx.Client(timeout=settings.audio_fetch_timeout_s, follow_redirects=False) as client:
        for _ in range(settings.max_url_redirects + 1):
            try:
                validate_webhook_url(url, allow=allow)
            except UnsafeURLError as exc:
                raise AudioError(f"audio_url_{exc.code}", str(exc)) from None
            try:
                with client.stream("GET", url) as resp:
                    if resp.is_redirect and "location" in resp.headers:
                        url = str(resp.url.join(resp.headers["location"]))
                        continue
                    if resp.status_code != 200:
                        raise AudioError(
                            "audio_fetch_failed", f"GET {url} answered {resp.status_code}"
                        )
                    size = 0
                    with dest.open("wb") as fh:
                        for chunk in resp.iter_bytes():
                            size += len(chunk)
                            if size > limit:
                                raise AudioError(
                                    "audio_too_large", f"audio URL body over {limit} bytes"
                                )
                            fh.write(chunk)
                    return
            except httpx.HTTPError as exc:
                raise AudioError("audio_fetch_failed", f"fetching {url}: {exc}") from None
    raise AudioError("audio_fetch_failed", "too many redirects")


def load_job_audio(
    *, blob: str | None, url: str | None, settings: Settings
) -> tuple[np.ndarray, int]:
    """The samples and the input length in ms; AudioError says what is wrong with them."""
    with tempfile.TemporaryDirectory(prefix="whisperq-") as tmp:
        if blob is not None:
            path = blobs.blob_path(blob)
            if not path.is_file():
                raise AudioError("audio_missing", "the uploaded audio is gone from the blob store")
        elif url is not None:
            path = Path(tmp) / "input"
            fetch_url(url, path, settings=settings)
            if path.stat().st_size == 0:
                raise AudioError("empty_audio", "the audio URL returned an empty body")
        else:
            raise AudioError("audio_missing", "the job has no audio")
        duration = probe_duration_s(path)
        if duration > settings.max_audio_seconds:
            raise AudioError(
                "audio_too_long",
                f"audio is {duration:.0f} s; the limit is {settings.max_audio_seconds:.0f} s",
            )
        samples = decode(path, timeout_s=settings.ffmpeg_timeout_s)
    return samples, round(len(samples) * 1000 / SAMPLE_RATE)
