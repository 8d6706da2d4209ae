"""The hosted API's endpoint: POST /v1/inference/openai/whisper-tiny."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from starlette.datastructures import FormData, UploadFile

from app.api import schemas
from app.api.deps import CurrentKey, SettingsDep, completion_listener
from app.api.ratelimit import check_submission_limits
from app.api.uploads import read_form, store_upload
from app.errors import ServiceError, is_caller_fault
from app.infra import blobs
from app.infra.db import get_sessionmaker
from app.infra.models import TERMINAL_STATUSES, Job, JobStatus
from app.infra.notify import CompletionListener
from app.jobs import idempotency
from app.jobs.idempotency import Submitted
from app.jobs.options import OptionError, TranscribeOptions, parse_options
from app.jobs.serialize import inference_response
from app.jobs.submission import (
    AudioInput,
    check_url,
    decode_data_url,
    drop_unclaimed,
    submit_job,
    upload_name,
)
from app.settings import Settings

router = APIRouter()

OPTION_FIELDS = (
    "task",
    "language",
    "temperature",
    "patience",
    "suppress_tokens",
    "initial_prompt",
    "condition_on_previous_text",
    "temperature_increment_on_fallback",
    "compression_ratio_threshold",
    "logprob_threshold",
    "no_speech_threshold",
    "word_timestamps",
    "prepend_punctuations",
    "append_punctuations",
    "best_of",
    "length_penalty",
    "clip_timestamps",
    "hallucination_silence_threshold",
    "carry_initial_prompt",
)


async def _read_audio(value: Any, settings: Settings) -> AudioInput:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ServiceError(
            422, "missing_audio", "send 'audio' as a file upload or a URL", field="audio"
        )
    if isinstance(value, UploadFile):
        blob, claimed_ms, sha256 = await store_upload(value, settings)  # streamed, not whole
        return AudioInput(
            blob=blob,
            input_length_ms=claimed_ms,
            sha256=sha256,
            source_name=upload_name(value.filename),
        )
    text = str(value).strip()
    if text.startswith("data:"):
        return AudioInput(data=decode_data_url(text, max_bytes=settings.max_upload_bytes))
    url = await run_in_threadpool(
        check_url, text, field="audio_url", allowlist=settings.audio_url_allowlist
    )
    return AudioInput(url=url)


async def submit_owning_upload(audio: AudioInput, submit: Callable[[], Submitted]) -> Submitted:
    """Run ``submit`` in a worker thread. Until a job names the upload, this request owns
    it: whatever refuses or fails the submission, the upload is deleted before the error
    answers (an orphan would otherwise wait a day for the purge)."""
    try:
        return await run_in_threadpool(submit)
    except Exception:
        if audio.blob is not None:
            await run_in_threadpool(drop_unclaimed, audio.blob)
        raise


def _load(job_id: str) -> Job | None:
    with get_sessionmaker()() as session:
        return session.get(Job, job_id)


async def _wait_for(
    job_id: str, *, listener: CompletionListener, timeout_s: float, recheck_s: float
) -> Job | None:
    """Wait for the job's completion signal, holding no database connection meanwhile. The
    row is re-read after each wake-up and every ``recheck_s``: a lost signal only delays."""
    deadline = time.monotonic() + timeout_s
    event = listener.register(job_id)  # before the first read, so no signal falls between
    try:
        while True:
            event.clear()
            job = await run_in_threadpool(_load, job_id)
            left = deadline - time.monotonic()
            if job is None or job.status in TERMINAL_STATUSES or left <= 0:
                return job
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), timeout=min(left, recheck_s))
    finally:
        listener.unregister(job_id, event)


def _status_code(job: Job) -> int:
    if job.status == JobStatus.succeeded:
        return 200
    if job.status == JobStatus.failed:
        return 422 if is_caller_fault(job.error_code) else 500
    if job.status == JobStatus.canceled:
        return 409
    return 202  # still running when the sync wait ran out: poll GET /v1/jobs/{id}


async def _read_request(
    form: FormData, settings: Settings
) -> tuple[TranscribeOptions, str | None, AudioInput]:
    try:
        fields: dict[str, str | None] = {}
        for name in OPTION_FIELDS:
            raw = form.get(name)
            if isinstance(raw, UploadFile):
                raise OptionError(name, f"{name} must be a form field, not a file")
            fields[name] = raw
        options = parse_options(fields)
    except OptionError as exc:
        raise ServiceError(422, "invalid_option", exc.message, field=exc.field) from None
    webhook = form.get("webhook")
    webhook_url = None
    if isinstance(webhook, str) and webhook.strip():
        webhook_url = await run_in_threadpool(
            check_url, webhook.strip(), field="webhook", allowlist=settings.webhook_allowlist
        )
    return options, webhook_url, await _read_audio(form.get("audio"), settings)


@router.post(
    "/v1/inference/openai/whisper-tiny",
    tags=["inference"],
    summary="Transcribe or translate audio (the hosted whisper-tiny API)",
    response_model=schemas.InferenceResponse,
    responses={
        202: {
            "model": schemas.InferenceResponse,
            "description": "with a webhook: accepted; without: still running when the sync "
            "wait ran out (poll GET /v1/jobs/{request_id})",
        },
        409: {"model": schemas.InferenceResponse, "description": "the job was canceled"},
        **schemas.error_responses(400, 401, 413, 422, 429, 503),
        500: {"model": schemas.InferenceResponse, "description": "the job failed on our side"},
    },
    openapi_extra=schemas.INFERENCE_FORM,
)
async def infer(
    request: Request,
    key: CurrentKey,
    settings: SettingsDep,
    idempotency_key: Annotated[
        str | None, Header(alias=idempotency.HEADER, description=idempotency.HEADER_DOC)
    ] = None,
) -> JSONResponse:
    await check_submission_limits(key.id, settings)
    form = await read_form(request, settings)  # byte-capped, chunked or not
    try:
        options, webhook_url, audio = await _read_request(form, settings)
    finally:
        await form.close()  # spooled upload files must not outlive the request

    submitted = await submit_owning_upload(
        audio,
        lambda: idempotency.submit_once(
            api_key_id=key.id,
            key=idempotency_key,
            upload=audio.blob,
            fingerprint=idempotency.fingerprint(
                request.url.path, {"options": options.to_json(), "webhook": webhook_url}, audio
            ),
            submit=lambda: submit_job(
                api_key_id=key.id,
                options=options,
                audio=audio,
                webhook_url=webhook_url,
                queue=settings.queue_interactive,
                settings=settings,
            ),
            ttl_s=settings.idempotency_ttl_s,
        ),
    )
    job = submitted.job
    headers = {"Idempotent-Replayed": "true"} if submitted.replayed else None
    if submitted.replayed and audio.blob is not None:
        blobs.delete_blob(audio.blob)  # this request's copy: the replayed job has its own
    if webhook_url is not None:
        return JSONResponse(inference_response(job), status_code=202, headers=headers)
    done = await _wait_for(
        job.id,
        listener=completion_listener(request.app),
        timeout_s=settings.sync_wait_s,
        recheck_s=settings.sync_recheck_s,
    )
    assert done is not None
    return JSONResponse(inference_response(done), status_code=_status_code(done), headers=headers)
