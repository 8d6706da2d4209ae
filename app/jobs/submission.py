"""Accepting a job: audio in the blob store, a row committed, then its id on the queue."""

from __future__ import annotations

import base64
import binascii
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote_to_bytes

from sqlalchemy import and_, select

from app.errors import ServiceError
from app.infra import blobs
from app.infra.audio_probe import AudioError, probe_duration_s
from app.infra.db import session_scope, utcnow
from app.infra.models import Job, JobStatus, new_job_id
from app.infra.queue import SendError, send_jobs
from app.infra.ssrf import AllowList, UnsafeURLError, validate_webhook_url
from app.jobs import served_model
from app.jobs.lifecycle import end_jobs
from app.jobs.options import TranscribeOptions
from app.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AudioInput:
    data: bytes | None = None
    url: str | None = None
    # An upload already streamed into the blob store and probed (app/api/uploads.py).
    blob: str | None = None
    input_length_ms: int | None = None
    sha256: str | None = None  # of the upload's bytes, for idempotency
    # The uploaded file's name, so people find their job by it (/jobs); never a path.
    source_name: str | None = None


def upload_name(filename: str | None) -> str | None:
    """The last part of a client's file name, cut to what a page shows (no folders: a name
    like ``../../etc/passwd`` or ``C:\\x\\a.wav`` is only ever its last part)."""
    name = (filename or "").replace("\\", "/").rsplit("/", 1)[-1].strip()
    return name[:200] or None


def decode_data_url(value: str, *, max_bytes: int) -> bytes:
    header, comma, payload = value[5:].partition(",")
    if not comma:
        raise ServiceError(422, "invalid_audio_url", "malformed data: URL", field="audio")
    try:
        if header.endswith(";base64"):
            data = base64.b64decode(payload, validate=True)
        else:
            data = unquote_to_bytes(payload)
    except (binascii.Error, ValueError):
        raise ServiceError(
            422, "invalid_audio_url", "data: URL is not valid base64", field="audio"
        ) from None
    if len(data) > max_bytes:
        raise ServiceError(413, "audio_too_large", f"audio over {max_bytes} bytes", field="audio")
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
        raise ServiceError(422, code, message, field=field) from None
    return value


def store_and_probe(job_id: str, data: bytes, *, settings: Settings) -> int:
    """Write the upload to the blob store and check it is audio we will accept; returns ms."""
    if not data:
        raise ServiceError(400, "empty_audio", "the audio file is empty", field="audio")
    # Probed in a local scratch file, then handed to the blob store (maybe another host's).
    with tempfile.TemporaryDirectory(prefix="whisperq-up-") as tmp:
        path = Path(tmp) / job_id
        path.write_bytes(data)
        return probe_and_store(path, job_id, settings=settings)


def probe_and_store(path: Path, name: str, *, settings: Settings) -> int:
    """Check a local file is audio we will accept, then put it in the blob store as ``name``;
    returns its length in ms. ServiceError (and nothing stored) when it is not acceptable."""
    try:
        duration = probe_duration_s(path)
    except AudioError as exc:
        raise ServiceError(400, exc.code, exc.message, field="audio") from None
    if duration > settings.max_audio_seconds:
        raise ServiceError(
            413,
            "audio_too_long",
            f"audio is {duration:.0f} s; the limit is {settings.max_audio_seconds:.0f} s",
            field="audio",
        )
    blobs.get_store().put_file(name, path)
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
    try:
        served_model.check_options(options, settings=settings)
    except ServiceError:
        if audio.blob is not None:  # an upload that never becomes a job is not kept
            blobs.delete_blob(audio.blob)
        raise
    job_id = new_job_id()
    input_length_ms = audio.input_length_ms
    audio_blob = audio.blob
    if audio.data is not None:
        input_length_ms = store_and_probe(job_id, audio.data, settings=settings)
        audio_blob = job_id
    job = Job(
        id=job_id,
        api_key_id=api_key_id,
        status=JobStatus.queued,
        queue=queue,
        options=options.to_json(),
        audio_blob=audio_blob,
        audio_url=audio.url,
        webhook_url=webhook_url,
        input_length_ms=input_length_ms,
        source_name=audio.source_name,
        enqueued_at=utcnow(),
    )
    try:
        with session_scope() as session:
            session.add(job)
    except Exception:  # Postgres down: no row, so no blob either (the caller gets a 503)
        if job.audio_blob is not None:
            blobs.delete_blob(job.audio_blob)
        raise
    log.info("job accepted", extra={"request_id": job_id, "queue": queue})
    # Only after the commit: a worker must never receive an id it cannot read yet.
    enqueue_jobs([job_id], queue=queue, settings=settings)
    return job


def enqueue_jobs(job_ids: list[str], *, queue: str, settings: Settings) -> None:
    """Send committed jobs to the broker; if it is down, fail the ones not sent (a job must
    not be left queued forever in silence) and answer 503."""
    try:
        send_jobs(job_ids, queue=queue)
    except SendError as failed:
        job_id = job_ids[failed.sent]
        log.error("enqueue failed from job %s on: %r", job_id, failed.cause)
        _fail_unsent(job_ids[failed.sent :], failed.cause, settings)
        raise ServiceError(
            503,
            "queue_unavailable",
            "the job queue is unreachable; retry later",
            extra={"request_id": job_id},
        ) from None


def _fail_unsent(job_ids: list[str], exc: Exception, settings: Settings) -> None:
    with session_scope() as session:
        end_jobs(
            session,
            JobStatus.failed,
            where=and_(Job.id.in_(job_ids), Job.status == JobStatus.queued),
            settings=settings,
            error_code="queue_unavailable",
            error_message=f"could not reach the job queue: {exc}",
            # The client may send a batch's inputs again once the broker is back, and they
            # run then (app/jobs/batches.py): their batch must not end on them now. The
            # reaper's sweep ends it if nobody does.
            batch_hook=False,
        )


def drop_unclaimed(name: str) -> None:
    """Delete an upload that no job names (its request was refused, or failed before a job
    took it). Never raises: if the database cannot say, the orphan purge deletes it later."""
    try:
        with session_scope() as session:
            named = session.scalar(select(Job.id).where(Job.audio_blob == name).limit(1))
        if named is None:
            blobs.delete_blob(name)
    except Exception:
        log.warning("upload %s not deleted now; the orphan purge will", name, exc_info=True)
