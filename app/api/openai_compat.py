"""OpenAI's audio API: ``POST /v1/audio/transcriptions`` and ``/v1/audio/translations``, and
``GET /v1/models`` listing the model names they accept.

Code written against OpenAI (the official client included) works unchanged once pointed at
whisperq: same form fields, same response formats, errors in OpenAI's shape (app/api/errors.py
answers every error under /v1/audio/ that way). Each call is an ordinary job on the
interactive queue, metered and visible in ``GET /v1/jobs``; its id is in ``x-request-id``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel
from starlette.datastructures import FormData, UploadFile

from app.api import inference, schemas
from app.api.deps import CurrentKey, SettingsDep, completion_listener
from app.api.ratelimit import check_submission_limits
from app.api.uploads import read_form
from app.errors import ErrorCode, ServiceError, is_caller_fault
from app.infra import blobs
from app.infra.models import Job, JobStatus
from app.jobs import idempotency, served_model
from app.jobs.languages import LANGUAGES
from app.jobs.options import OptionError, TranscribeOptions, parse_options
from app.jobs.serialize import detailed_segment
from app.jobs.served_model import ServedModel
from app.jobs.submission import AudioInput, submit_job
from app.jobs.transcripts import to_srt, to_vtt
from app.settings import Settings

router = APIRouter(tags=["OpenAI-compatible"])

TRANSCRIPTIONS = "/v1/audio/transcriptions"
TRANSLATIONS = "/v1/audio/translations"
MODELS = "/v1/models"
# ``created`` of a name no worker has published yet: Whisper's release (2022-09-21).
WHISPER_RELEASED = 1663718400
OWNED_BY = "whisperq"
GRANULARITIES = frozenset({"segment", "word"})
# Our option names where OpenAI's differ, for error messages that name the caller's field.
OPENAI_FIELD = {
    "initial_prompt": "prompt",
    "audio": "file",
    "word_timestamps": "timestamp_granularities[]",
}


@dataclass(frozen=True)
class CompatRequest:
    options: TranscribeOptions
    response_format: str
    granularities: frozenset[str]
    audio: AudioInput

    def fingerprint_params(self) -> dict[str, Any]:
        return {
            "options": self.options.to_json(),
            "response_format": self.response_format,
            "granularities": sorted(self.granularities),
        }


@contextmanager
def _openai_fields() -> Iterator[None]:
    """Errors from the shared submission path name our fields; name the caller's."""
    try:
        yield
    except ServiceError as exc:
        exc.field = OPENAI_FIELD.get(exc.field or "", exc.field)
        raise


def _invalid(field: str, message: str) -> ServiceError:
    return ServiceError.of(ErrorCode.invalid_option, message, field=field)


def _text_field(form: FormData, name: str) -> str | None:
    raw = form.get(name)
    if isinstance(raw, UploadFile):
        raise _invalid(name, f"{name} must be a form field, not a file")
    return raw


def _check_model(model: str | None, settings: Settings, served: ServedModel | None) -> None:
    if not model or not model.strip():
        raise _invalid("model", "model is required (e.g. whisper-1)")
    accepted = served_model.public_names(settings, served)
    if model.strip() not in accepted:
        raise _invalid(
            "model",
            f"model {_excerpt(model)} is not served here; use one of {accepted}",
        )


def _excerpt(raw: str, limit: int = 40) -> str:
    """The caller's value echoed back, cut short: a 5 kB field is not worth repeating."""
    return repr(raw if len(raw) <= limit else raw[:limit] + "...")


async def _read(form: FormData, settings: Settings, *, task: str) -> CompatRequest:
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise ServiceError.of(
            ErrorCode.missing_audio, "send the audio as a multipart file named 'file'", field="file"
        )
    served = await run_in_threadpool(served_model.current, settings.redis_url)
    _check_model(_text_field(form, "model"), settings, served)
    response_format = (_text_field(form, "response_format") or "json").strip()
    if response_format not in schemas.OPENAI_RESPONSE_FORMATS:
        raise _invalid(
            "response_format",
            f"response_format must be one of {list(schemas.OPENAI_RESPONSE_FORMATS)}",
        )
    granularities: set[str] = set()
    if task == "transcribe":
        for name in ("timestamp_granularities[]", "timestamp_granularities"):
            for raw in form.getlist(name):
                if isinstance(raw, UploadFile) or raw not in GRANULARITIES:
                    raise _invalid(name, "timestamp_granularities must be 'segment' or 'word'")
                granularities.add(raw)
    if granularities and response_format != "verbose_json":
        raise _invalid(
            "timestamp_granularities[]",
            "timestamp_granularities needs response_format=verbose_json",
        )
    fields = {
        "task": task,
        "language": _text_field(form, "language") if task == "transcribe" else None,
        "initial_prompt": _text_field(form, "prompt"),
        "temperature": _text_field(form, "temperature"),
        "word_timestamps": "true" if "word" in granularities else None,
    }
    try:
        options = parse_options(fields)
    except OptionError as exc:
        raise _invalid(OPENAI_FIELD.get(exc.field, exc.field), exc.message) from None
    # Before the upload is streamed in (submit_job checks again, for the native route too).
    if served is not None and (refused := served.refusal(options)) is not None:
        raise refused
    with _openai_fields():
        audio = await inference._read_audio(upload, settings)
    return CompatRequest(options, response_format, frozenset(granularities), audio)


def _failure(job: Job) -> ServiceError:
    headers = {"x-request-id": job.id}
    if job.status == JobStatus.canceled:
        err = ServiceError.of(ErrorCode.canceled, "the job was canceled")
    elif job.status == JobStatus.failed:
        known = ErrorCode.lookup(job.error_code)
        status = known.status if known is not None and is_caller_fault(known) else 500
        err = ServiceError(
            status, job.error_code or ErrorCode.internal_error, job.error_message or ""
        )
    else:
        err = ServiceError.of(
            ErrorCode.job_still_running,
            f"job {job.id} is still running; fetch it later with GET /v1/jobs/{job.id}",
        )
    err.headers = headers
    return err


def render(job: Job, req: CompatRequest) -> Response:
    """A succeeded job in the response format the caller asked for."""
    assert job.result is not None
    headers = {"x-request-id": job.id}
    text = str(job.result["text"])
    segments = [detailed_segment(s) for s in job.result["segments"]]
    duration = (job.input_length_ms or 0) / 1000
    usage = {"type": "duration", "seconds": duration}
    if req.response_format == "json":
        return JSONResponse({"text": text, "usage": usage}, headers=headers)
    if req.response_format == "text":
        return PlainTextResponse(text + "\n", headers=headers)
    if req.response_format == "srt":
        return PlainTextResponse(to_srt(segments), headers=headers)
    if req.response_format == "vtt":
        return PlainTextResponse(to_vtt(segments), headers=headers)
    language = str(job.result["language"])
    body: dict[str, Any] = {
        "task": req.options.task,
        "language": LANGUAGES.get(language, language),
        "duration": duration,
        "text": text,
        "usage": usage,
    }
    if "segment" in req.granularities or not req.granularities:
        body["segments"] = [{k: v for k, v in s.items() if k != "words"} for s in segments]
    if "word" in req.granularities:
        body["words"] = [
            {"word": w["word"].strip(), "start": w["start"], "end": w["end"]}
            for s in segments
            for w in s["words"] or ()
        ]
    return JSONResponse(body, headers=headers)


async def _serve(
    request: Request,
    key: CurrentKey,
    settings: Settings,
    idempotency_key: str | None,
    *,
    task: Literal["transcribe", "translate"],
) -> Response:
    await check_submission_limits(key.id, settings)
    form = await read_form(request, settings)  # byte-capped, chunked or not
    try:
        req = await _read(form, settings, task=task)
    finally:
        await form.close()
    with _openai_fields():
        submitted = await inference.submit_owning_upload(
            req.audio,
            lambda: idempotency.submit_once(
                api_key_id=key.id,
                key=idempotency_key,
                fingerprint=idempotency.fingerprint(
                    request.url.path, req.fingerprint_params(), req.audio
                ),
                submit=lambda: submit_job(
                    api_key_id=key.id,
                    options=req.options,
                    audio=req.audio,
                    webhook_url=None,
                    queue=settings.queue_interactive,
                    settings=settings,
                ),
                ttl_s=settings.idempotency_ttl_s,
                upload=req.audio.blob,
            ),
        )
    if submitted.replayed and req.audio.blob is not None:
        blobs.delete_blob(req.audio.blob)  # this request's copy: the replayed job has its own
    done = await inference._wait_for(
        submitted.job.id,
        listener=completion_listener(request.app),
        timeout_s=settings.sync_wait_s,
        recheck_s=settings.sync_recheck_s,
    )
    assert done is not None
    if done.status != JobStatus.succeeded:
        raise _failure(done)
    response = render(done, req)
    if submitted.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return response


RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "json and verbose_json as JSON; text, srt and vtt as text/plain",
        "content": {"text/plain": {"schema": {"type": "string"}}},
        "headers": {"x-request-id": {"description": "the job id", "schema": {"type": "string"}}},
    },
    **schemas.error_responses(400, 401, 409, 500, 503, 504, openai=True),
}
IdempotencyHeader = Annotated[
    str | None, Header(alias=idempotency.HEADER, description=idempotency.HEADER_DOC)
]
ResponseModel = schemas.OpenAITranscription | schemas.OpenAIVerboseTranscription


@router.post(
    TRANSCRIPTIONS,
    response_model=ResponseModel,
    responses=RESPONSES,
    openapi_extra=schemas.openai_form(translation=False),
    summary="Transcribe audio (OpenAI-compatible)",
)
async def transcriptions(
    request: Request,
    key: CurrentKey,
    settings: SettingsDep,
    idempotency_key: IdempotencyHeader = None,
) -> Response:
    return await _serve(request, key, settings, idempotency_key, task="transcribe")


@router.post(
    TRANSLATIONS,
    response_model=ResponseModel,
    responses=RESPONSES,
    openapi_extra=schemas.openai_form(translation=True),
    summary="Translate audio into English (OpenAI-compatible)",
)
async def translations(
    request: Request,
    key: CurrentKey,
    settings: SettingsDep,
    idempotency_key: IdempotencyHeader = None,
) -> Response:
    return await _serve(request, key, settings, idempotency_key, task="translate")


class OpenAIModel(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class OpenAIModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIModel]


async def _models(settings: Settings) -> list[OpenAIModel]:
    served = await run_in_threadpool(served_model.current, settings.redis_url)
    created = int(served.published_at) if served is not None else WHISPER_RELEASED
    return [
        OpenAIModel(id=name, created=created, owned_by=OWNED_BY)
        for name in served_model.public_names(settings, served)
    ]


@router.get(
    MODELS,
    response_model=OpenAIModelList,
    responses=schemas.error_responses(401),
    summary="The model names the audio routes accept (OpenAI-compatible)",
)
async def list_models(key: CurrentKey, settings: SettingsDep) -> OpenAIModelList:
    return OpenAIModelList(data=await _models(settings))


@router.get(
    MODELS + "/{model_id}",
    response_model=OpenAIModel,
    responses=schemas.error_responses(401, 404),
    summary="One model name the audio routes accept (OpenAI-compatible)",
)
async def get_model(model_id: str, key: CurrentKey, settings: SettingsDep) -> OpenAIModel:
    for model in await _models(settings):
        if model.id == model_id:
            return model
    raise ServiceError.of(ErrorCode.not_found, f"model {_excerpt(model_id)} is not served here")
