"""Getting a job's audio as 16 kHz float32: blob or URL, through a hardened ffmpeg.

Hostile input (issue 14):
* URLs are fetched by :func:`worker.audio_fetch.fetch_to_file`, the webhooks' guarded path:
  vetted and pinned addresses, re-vetted redirects, no proxies, one overall deadline and a
  size cap while streaming.
* The container header is only a first, cheap refusal: a FLAC can claim 1 s and hold hours.
  The *decoded* length is what is checked against ``max_audio_seconds`` (ffmpeg's output is
  cut one sample past the limit, so a lie costs at most the limit's worth of decoding) and
  what is returned as ``input_length_ms`` for metering.
* Error messages are generic and carry codes; what ffmpeg or a fetched server said (paths,
  internal status codes) goes to the log only.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import tempfile
import threading
import uuid
from pathlib import Path

import numpy as np

from app.errors import ErrorCode
from app.infra import blobs
from app.infra.audio_probe import (
    DEMUXER_WHITELIST,
    AudioError,
    probe_duration_s,
    wav_layout_of,
)
from app.infra.ssrf import AllowList
from app.settings import Settings
from worker.audio_fetch import FetchError, fetch_to_file

log = logging.getLogger(__name__)

SAMPLE_RATE = 16_000
BYTES_PER_SAMPLE = 2  # s16le
READ_CHUNK = 1 << 16
STDERR_TAIL = 4096

# What a caller may be told about a failed fetch: the SSRF verdicts keep their codes, the rest
# is one generic code and message (no status codes of internal hosts: no port scanner).
_FETCH_MESSAGES = {
    "too_large": (ErrorCode.audio_too_large, "the audio URL's body is over the size limit"),
    "timeout": (ErrorCode.audio_fetch_failed, "the audio URL did not answer in time"),
    "forbidden_address": (ErrorCode.audio_url_forbidden_address, "the audio URL is not allowed"),
    "unresolvable_host": (
        ErrorCode.audio_url_unresolvable_host,
        "the audio URL's host cannot be found",
    ),
    "invalid_url": (
        ErrorCode.audio_fetch_failed,
        "the audio URL or one of its redirects is invalid",
    ),
}
_FETCH_DEFAULT = (ErrorCode.audio_fetch_failed, "the audio URL could not be fetched")


def decode(path: Path, *, timeout_s: float, max_seconds: float | None = None) -> np.ndarray:
    """Decode with ffmpeg as openai-whisper does: local files only, known demuxers only, a
    time limit, and the output cut just past ``max_seconds``.

    AudioError ``audio_too_long`` when the decoded audio is longer than the limit (whatever
    its header says), ``invalid_audio`` when it does not decode or decodes to nothing.
    ``max_seconds=None`` (tests, trusted files) decodes everything.
    """
    cmd = [
        "ffmpeg",
        "-nostdin",
        "-hide_banner",
        "-loglevel",
        "error",
        "-protocol_whitelist",
        "file",
        "-format_whitelist",
        DEMUXER_WHITELIST,
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
    limit = (
        (int(max_seconds * SAMPLE_RATE) + 1) * BYTES_PER_SAMPLE if max_seconds is not None else -1
    )
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stderr is not None
    stderr_tail = bytearray()

    def drain_stderr() -> None:  # bounded: a crafted file can make ffmpeg print for ever
        assert proc.stderr is not None
        for line in proc.stderr:
            stderr_tail.extend(line)
            del stderr_tail[:-STDERR_TAIL]

    timed_out = threading.Event()

    def on_timeout() -> None:
        timed_out.set()
        proc.kill()

    err_thread = threading.Thread(target=drain_stderr, daemon=True)
    err_thread.start()
    timer = threading.Timer(timeout_s, on_timeout)
    timer.start()
    out = bytearray()
    too_long = False
    try:
        while chunk := proc.stdout.read(READ_CHUNK):
            out += chunk
            if 0 <= limit < len(out):
                too_long = True
                proc.kill()
                break
    finally:
        timer.cancel()
        proc.stdout.close()
        returncode = proc.wait()
        err_thread.join(5)
        proc.stderr.close()
    if too_long:
        raise AudioError(
            "audio_too_long", f"the decoded audio is longer than the {max_seconds or 0:.0f} s limit"
        )
    if timed_out.is_set():
        raise AudioError("invalid_audio", f"decoding the audio took over {timeout_s:.0f} s")
    if returncode != 0:
        log.info("ffmpeg failed (%s): %s", returncode, stderr_tail.decode(errors="replace")[-500:])
        raise AudioError("invalid_audio", "the audio could not be decoded")
    usable = len(out) - len(out) % BYTES_PER_SAMPLE
    samples = np.frombuffer(bytes(out[:usable]), np.int16).astype(np.float32) / 32768.0
    if samples.size == 0:
        raise AudioError("invalid_audio", "the audio decodes to no samples")
    return samples


# The one layout read without ffmpeg: what ffmpeg itself would produce, 16 kHz mono signed
# 16-bit PCM in a WAV file. Its samples pass through ffmpeg unchanged, so reading them here
# gives the same array without the two processes (ffprobe, ffmpeg) that cost more CPU than a
# short clip's whole control-plane path. Anything else goes to ffmpeg.
PLAIN_WAV = (1, 1, SAMPLE_RATE, 16)  # PCM, mono, 16 kHz, 16 bits


def read_plain_wav(path: Path, *, max_seconds: float | None = None) -> np.ndarray | None:
    """The samples of a 16 kHz mono s16le WAV as :func:`decode` returns them, or None when
    the file is anything else (ffmpeg decodes it then). Read to the data chunk's end or the
    file's, whichever comes first, as ffmpeg's WAV demuxer does; the limit applies to what
    is read, never to what the header claims."""
    with path.open("rb") as fh:
        layout = wav_layout_of(fh)
        if layout is None or (layout.tag, layout.channels, layout.rate, layout.bits) != PLAIN_WAV:
            return None
        limit = (
            (int(max_seconds * SAMPLE_RATE) + 1) * BYTES_PER_SAMPLE
            if max_seconds is not None
            else layout.data_size
        )
        fh.seek(layout.data_offset)
        data = fh.read(min(layout.data_size, limit + BYTES_PER_SAMPLE))
    if max_seconds is not None and len(data) > limit:
        raise AudioError(
            "audio_too_long", f"the decoded audio is longer than the {max_seconds:.0f} s limit"
        )
    usable = len(data) - len(data) % BYTES_PER_SAMPLE
    samples = np.frombuffer(data[:usable], np.int16).astype(np.float32) / 32768.0
    if samples.size == 0:
        raise AudioError("invalid_audio", "the audio decodes to no samples")
    return samples


def fetch_url(url: str, dest: Path, *, settings: Settings) -> None:
    """Download an audio URL through the guarded HTTP path; AudioError with a safe message."""
    with dest.open("wb") as fh:
        try:
            fetch_to_file(
                url,
                fh,
                timeout_s=settings.audio_fetch_timeout_s,
                allow=AllowList.parse(settings.audio_url_allowlist),
                max_bytes=settings.max_upload_bytes,
                max_redirects=settings.max_url_redirects,
            )
        except FetchError as exc:
            log.info("audio fetch failed: %s", exc.detail)
            code, message = _FETCH_MESSAGES.get(exc.reason, _FETCH_DEFAULT)
            raise AudioError(code, message) from None
        except Exception as exc:  # whatever a hostile server makes a parser raise: a reason
            log.warning("audio fetch raised %s", type(exc).__name__, exc_info=True)
            raise AudioError(*_FETCH_DEFAULT) from None


def load_job_audio(
    *, blob: str | None, url: str | None, settings: Settings
) -> tuple[np.ndarray, int]:
    """The samples and the *decoded* input length in ms; AudioError says what is wrong."""
    # A folder only when a download needs one: a local blob is read where it lies, and
    # making and removing a folder per job was most of a null-engine job's host time.
    scratch = Path(tempfile.gettempdir()) / f"whisperq-{uuid.uuid4().hex}"
    try:
        return _load(scratch, blob=blob, url=url, settings=settings)
    finally:
        if scratch.exists():
            shutil.rmtree(scratch, ignore_errors=True)


def _load(
    scratch: Path, *, blob: str | None, url: str | None, settings: Settings
) -> tuple[np.ndarray, int]:
    if blob is not None:
        try:
            path = blobs.get_store().local_path(blob, scratch)
        except blobs.BlobMissingError:
            raise AudioError(
                "audio_missing", "the uploaded audio is gone from the blob store"
            ) from None
    elif url is not None:
        scratch.mkdir(mode=0o700)
        path = scratch / "input"
        fetch_url(url, path, settings=settings)
        if path.stat().st_size == 0:
            raise AudioError("empty_audio", "the audio URL returned an empty body")
    else:
        raise AudioError("audio_missing", "the job has no audio")
    plain = read_plain_wav(path, max_seconds=settings.max_audio_seconds)
    if plain is not None:
        return plain, round(len(plain) * 1000 / SAMPLE_RATE)
    # The header's claim: a cheap early refusal only, never trusted for the limit.
    duration = probe_duration_s(path)
    if duration > settings.max_audio_seconds:
        raise AudioError(
            "audio_too_long",
            f"audio is {duration:.0f} s; the limit is {settings.max_audio_seconds:.0f} s",
        )
    samples = decode(
        path, timeout_s=settings.ffmpeg_timeout_s, max_seconds=settings.max_audio_seconds
    )
    return samples, round(len(samples) * 1000 / SAMPLE_RATE)
