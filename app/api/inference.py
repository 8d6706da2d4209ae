"""The hosted API's endpoint: POST /v1/inference/openai/whisper-tiny."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from starlette.datastructures import FormData, UploadFile

from app import idempotency, schemas
from app.api.deps import CurrentKey, SettingsDep
from app.db import get_sessionmaker
from app.errors import ApiError, is_caller_fault
from app.models import TERMINAL_STATUSES, Job, JobStatus
from app.options import OptionError, TranscribeOptions, parse_options
from app.serialize import inference_response
from app.settings import Settings
from app.submission import AudioInput, check_url, decode_data_url, submit_job

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
)


async def _read_audio(value: Any, settings: Settings) -> AudioInput:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ApiError(
            422, "missing_audio", "send 'audio' as a file upload or a URL", field="audio"
        )
    if isinstance(value, UploadFile):
        if value.size is not None and value.size > settings.max_upload_bytes:
            raise ApiError(
                413,
                "audio_too_large",
                f"audio over {settings.max_upload_bytes} bytes",
                field="audio",
            )
        return AudioInput(data=await value.read())
    text = str(value).strip()
    if text.startswith("data:"):
        return AudioInput(data=decode_data_url(text, max_bytes=settings.max_upload_bytes))
    url = await run_in_threadpool(
        check_url, text, field="audio_url", allowlist=settings.audio_url_allowlist
    )
    return AudioInput(url=url)


def _load(job_id: str) -> Job | None:
    with get_sessionmaker()() as session:
        return session.get(Job, job_id)


async def _wait_for(job_id: str, *, timeout_s: float) -> Job | None:
    deadline = time.monotonic() + timeout_s
    delay = 0.05
    while True:
        job = await run_in_threadpool(_load, job_id)
        if job is None or job.status in TERMINAL_STATUSES or time.monotonic() >= deadline:
            return job
        await asyncio.sleep(delay)
        delay = min(delay * 1.5, 0.5)


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
        raise ApiError(422, "invalid_option", exc.message, field=exc.field) from None
    webhook = form.get("webhook")
    webhook_url = None
    if isinstance(webhook, str) and webhook.strip():
        webhook_url = await run_in_threadpool(
            check_url, webhook.strip(), field="webhook", allowlist=settings.webhook_allowlist
        )
    return options, webhook_url, await _read_audio(form.get("audio"), settings)


@router.post(
    "/v1/inference/openai/whisper-tiny",
    response_model=schemas.InferenceResponse,
    responses={
        202: {
            "model": schemas.InferenceResponse,
            "description": "with a webhook: accepted; without: still running when the sync "
            "wait ran out (poll GET /v1/jobs/{request_id})",
        },
        409: {"model": schemas.InferenceResponse, "description": "the job was canceled"},
        **schemas.error_responses(400, 401, 413, 422, 503),
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
    declared = int(request.headers.get("content-length") or 0)
    if declared > settings.max_upload_bytes + 1024 * 1024:
        raise ApiError(
            413, "audio_too_large", f"request over {settings.max_upload_bytes} bytes", field="audio"
        )
    try:
        form = await request.form(max_files=2, max_fields=64)
    except Exception as exc:  # malformed multipart body
        raise ApiError(400, "invalid_form", f"could not read the form: {exc}") from None
    try:
        options, webhook_url, audio = await _read_request(form, settings)
    finally:
        await form.close()  # spooled upload files must not outlive the request

    submitted = await run_in_threadpool(
        lambda: idempotency.submit_once(
            api_key_id=key.id,
            key=idempotency.check_key(idempotency_key),
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
        )
    )
    job = submitted.job
    headers = {"Idempotent-Replayed": "true"} if submitted.replayed else None
    if webhook_url is not None:
        return JSONResponse(inference_response(job), status_code=202, headers=headers)
    done = await _wait_for(job.id, timeout_s=settings.sync_wait_s)
    assert done is not None
    return JSONResponse(inference_response(done), status_code=_status_code(done), headers=headers)
