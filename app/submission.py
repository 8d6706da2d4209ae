"""Accepting a job: audio in the blob store, a row committed, then its id on the queue."""

from __future__ import annotations

import base64
import binascii
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote_to_bytes

from app import blobs
from app.audio_probe import AudioError, probe_duration_s
from app.db import session_scope, utcnow
from app.errors import ApiError
from app.models import Job, JobStatus, new_job_id
from app.options import TranscribeOptions
from app.queue import send_job
from app.settings import Settings
from app.ssrf import AllowList, UnsafeURLError, validate_webhook_url

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AudioInput:
    data: bytes | None = None
    url: str | None = None


def decode_data_url(value: str, *, max_bytes: int) -> bytes:
    header, comma, payload = value[5:].partition(",")
    if not comma:
        raise ApiError(422, "invalid_audio_url", "malformed data: URL", field="audio")
    try:
        if header.endswith(";base64"):
            data = base64.b64decode(payload, validate=True)
        else:
            data = unquote_to_bytes(payload)
    except (binascii.Error, ValueError):
        raise ApiError(
            422, "invalid_audio_url", "data: URL is not valid base64", field="audio"
        ) from None
    if len(data) > max_bytes:
        raise ApiError(413, "audio_too_large", f"audio over {max_bytes} bytes", field="audio")
    return data


def check_url(value: str, *, field: str, allowlist: list[str]) -> str:
    """The SSRF guard's verdict as an API error: ``invalid_url`` for a malformed URL,
    ``<field>_forbidden_address`` / ``<field>_unresolvable_host`` for where it points."""
    try:
        validate_webhook_url(value, allow=AllowList.parse(allowlist))
    except UnsafeURLError as exc:
        code = exc.code if exc.code == "invalid_url" else f"{field}_{exc.code}"
        message = str(exc)
        if exc.code == "forbidden_address":  # say which setting lets an operator allow it
            message += f" (an operator may allow it in WHISPERQ_{field.upper()}_ALLOWLIST)"
        raise ApiError(422, code, message, field=field) from None
    return value


def store_and_probe(job_id: str, data: bytes, *, settings: Settings) -> int:
    """Write the upload to the blob store and check it is audio we will accept; returns ms."""
    if not data:
        raise ApiError(400, "empty_audio", "the audio file is empty", field="audio")
    # Probed in a local scratch file, then streamed to the blob store (maybe another host's).
    with tempfile.TemporaryDirectory(prefix="whisperq-up-") as tmp:
        path = Path(tmp) / job_id
        path.write_bytes(data)
        try:
            duration = probe_duration_s(path)
        except AudioError as exc:
            raise ApiError(400, exc.code, exc.message, field="audio") from None
        if duration > settings.max_audio_seconds:
            raise ApiError(
                413,
                "audio_too_long",
                f"audio is {duration:.0f} s; the limit is {settings.max_audio_seconds:.0f} s",
                field="audio",
            )
        blobs.get_store().put_file(job_id, path)
    return round(duration * 1000)


def submit_job(
    *,
    api_key_id: int,
    options: TranscribeOptions,
    audio: AudioInput,
    webhook_url: str | None,
    queue: str,
    settings: Settings,
) -> Job:
    job_id = new_job_id()
    input_length_ms = None
    if audio.data is not None:
        input_length_ms = store_and_probe(job_id, audio.data, settings=settings)
    job = Job(
        id=job_id,
        api_key_id=api_key_id,
        status=JobStatus.queued,
        queue=queue,
        options=options.to_json(),
        audio_blob=job_id if audio.data is not None else None,
        audio_url=audio.url,
        webhook_url=webhook_url,
        input_length_ms=input_length_ms,
        enqueued_at=utcnow(),
    )
    with session_scope() as session:
        session.add(job)
    log.info("job accepted", extra={"request_id": job_id, "queue": queue})
    # Only after the commit: a worker must never receive an id it cannot read yet.
    try:
        send_job(job_id, queue=queue)
    except Exception as exc:  # broker down: the job must not be left queued forever in silence
        log.exception("enqueue failed for job %s", job_id)
        with session_scope() as session:
            row = session.get(Job, job_id)
            if row is not None and row.status == JobStatus.queued:
                row.status = JobStatus.failed
                row.error_code = "queue_unavailable"
                row.error_message = f"could not reach the job queue: {exc}"
                row.finished_at = utcnow()
        raise ApiError(
            503,
            "queue_unavailable",
            "the job queue is unreachable; retry later",
            extra={"request_id": job_id},
        ) from None
    return job
