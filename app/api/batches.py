"""Batches (issue 13): many inputs in one go, progress, JSONL results, cancel, a webhook
when the whole batch has ended.

Inputs come as multipart (``file`` parts, ``url`` fields, a JSONL ``manifest``) or as JSON
(``{"urls": [...], "inputs": [...]}``). A batch created with ``open=true`` takes more
inputs through ``POST /v1/batches/{id}/files`` until ``POST /v1/batches/{id}/seal``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Iterator
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ValidationError
from sqlalchemy import select, tuple_

from app.api import schemas
from app.api.batch_inputs import (
    ID_MAX,
    build_inputs,
    check_options,
    option_text,
    parse_manifest,
)
from app.api.batch_schemas import (
    JSONL,
    AcceptedInput,
    BatchAccepted,
    BatchAddJSON,
    BatchCanceled,
    BatchCounts,
    BatchCreateJSON,
    BatchList,
    BatchOut,
    InputLine,
    ResultError,
    ResultLine,
    jsonl_doc,
)
from app.api.batch_upload import BatchForm, read_batch_form
from app.api.deps import CurrentKey, SettingsDep
from app.api.inference import OPTION_FIELDS
from app.api.jobs import _delivery as delivery_out
from app.api.ratelimit import check_request_rate
from app.api.uploads import _upload_slot as upload_slot
from app.errors import ServiceError
from app.infra.db import get_sessionmaker, utcnow
from app.infra.models import ApiKey, Batch, Job, JobStatus, WebhookDelivery
from app.jobs import batches
from app.jobs.limits import LimitError
from app.jobs.serialize import iso
from app.jobs.submission import check_url, drop_unclaimed
from app.settings import Settings

router = APIRouter(tags=["batches"])

TRUE = frozenset({"true", "1", "yes", "on"})


# ---- helpers ---------------------------------------------------------------------------


def batch_out(batch: Batch, s: batches.Stats) -> BatchOut:
    e = batches.eta(s, now=utcnow())
    return BatchOut(
        id=batch.id,
        status=batches.status_of(batch),
        created_at=iso(batch.created_at),
        sealed_at=iso(batch.sealed_at),
        canceled_at=iso(batch.canceled_at),
        finished_at=iso(batch.finished_at),
        webhook=batch.webhook_url,
        options=batch.default_options,
        counts=BatchCounts(**{k: s.counts[k] for k in JobStatus}, total=s.total),
        progress=round(s.finished / s.total, 6) if s.total else 0.0,
        audio_seconds_done=s.audio_ms_done / 1000,
        audio_seconds_total=s.audio_ms_total / 1000,
        inputs_without_duration=s.inputs_without_duration,
        cost=round(s.cost, 10),
        runtime_ms=s.runtime_ms,
        rate_audio_seconds_per_second=e.rate_audio_s_per_s,
        rate_jobs_per_second=e.rate_jobs_per_s,
        eta_seconds=None if e.eta_s is None else round(e.eta_s, 3),
    )


def load_batch_out(batch_id: str, key: ApiKey) -> BatchOut:
    with get_sessionmaker()() as session:
        batch = batches.owned_batch(session, batch_id=batch_id, api_key_id=key.id)
        s = batches.stats(session, batch.id)
    if batch.finished_at is None and batch.sealed_at is not None and s.unfinished == 0:
        # Its last job ended on a path without the hook: end it now (still exactly once).
        batches.end_if_done(batch.id)
        with get_sessionmaker()() as session:
            batch = batches.owned_batch(session, batch_id=batch_id, api_key_id=key.id)
            s = batches.stats(session, batch.id)
    return batch_out(batch, s)


def _accepted(batch_id: str, key: ApiKey, accepted: list[batches.Accepted]) -> BatchAccepted:
    return BatchAccepted(
        batch=load_batch_out(batch_id, key),
        inputs=[
            AcceptedInput(
                job_id=a.job_id,
                custom_id=a.custom_id,
                idempotency_key=a.idempotency_key,
                status=a.status,
                duplicate=a.duplicate,
            )
            for a in accepted
        ],
        created=sum(not a.duplicate for a in accepted),
        duplicates=sum(a.duplicate for a in accepted),
    )


def _one(form: BatchForm, name: str) -> str | None:
    values = form.fields.get(name) or []
    if len(values) > 1:
        raise ServiceError(422, "invalid_request", f"{name!r} given more than once", field=name)
    return values[0].strip() if values else None


def _urls(form: BatchForm) -> list[str]:
    out: list[str] = []
    for name in ("url", "urls"):
        for value in form.fields.get(name, []):
            # Split as batch_upload counted them while they streamed in.
            out.extend(u.strip() for u in value.split("\n") if u.strip())
    return out


def _check_fields(form: BatchForm, allowed: set[str]) -> None:
    unknown = sorted(set(form.fields) - allowed)
    if unknown:
        raise ServiceError(
            422, "unknown_field", f"unknown form field {unknown[0]!r}", field=unknown[0]
        )


async def _read_json(request: Request, model: type[BaseModel], settings: Settings) -> Any:
    cap = settings.batch_max_manifest_bytes
    # Connection: close, or the server would drain (read and discard) the rest of the body.
    too_large = LimitError(
        413,
        "request_too_large",
        f"JSON body over {cap} bytes; use a manifest upload",
        headers={"Connection": "close"},
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > cap:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > cap:
            raise too_large
    try:
        # Megabytes of JSON: parsed off the event loop, which other requests need meanwhile.
        return await run_in_threadpool(model.model_validate_json, bytes(body))
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or None
        raise ServiceError(422, "invalid_request", str(first["msg"]), field=loc) from None


def _is_json(request: Request) -> bool:
    return request.headers.get("content-type", "").split(";")[0].strip() == "application/json"


def _idempotency_key(value: str | None) -> str | None:
    if value is None or not value.strip():
        return None
    if len(value.strip()) > ID_MAX:
        raise ServiceError(
            422, "invalid_request", f"Idempotency-Key over {ID_MAX} chars", field="Idempotency-Key"
        )
    return value.strip()


async def _read_inputs(
    request: Request, settings: Settings, *, batch_defaults: dict[str, str] | None = None
) -> tuple[list[batches.NewInput], dict[str, str], str | None, bool]:
    """Inputs, batch default options (raw), webhook, open: from multipart or JSON. Adding to
    a batch (``batch_defaults`` given), its inputs are parsed over the batch's defaults."""
    create = batch_defaults is None
    if _is_json(request):
        body = await _read_json(request, BatchCreateJSON if create else BatchAddJSON, settings)
        defaults: dict[str, str] = dict(batch_defaults or {})
        webhook: str | None = None
        is_open = False
        if isinstance(body, BatchCreateJSON):
            defaults = {k: option_text(v) for k, v in body.options.items()}
            check_options(defaults)
            webhook, is_open = body.webhook, body.open
        inputs = await build_inputs(
            files=[],
            lines=list(enumerate(body.inputs, start=1)),
            urls=body.urls,
            defaults=defaults,
            settings=settings,
        )
        return inputs, defaults, webhook, is_open
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ServiceError(
            415, "unsupported_media_type", "send multipart/form-data or application/json"
        )
    # The same per-process gate single submissions read their bodies through: a batch of
    # files must not get around ``upload_concurrency`` (disk, ffprobe and CPU per body).
    async with upload_slot(settings):
        form = await read_batch_form(
            request, settings=settings, max_files=settings.batch_max_inputs_per_request
        )
    try:
        allowed = {"url", "urls"}
        if create:
            allowed |= {*OPTION_FIELDS, "webhook", "open"}
        _check_fields(form, allowed)
        defaults = dict(batch_defaults or {})
        for name in OPTION_FIELDS:
            value = _one(form, name)
            if value is not None:
                defaults[name] = value
        check_options(defaults)
        # Up to batch_max_manifest_bytes of JSON: parsed in a worker thread, so the event
        # loop (every other request, /healthz too) is not stopped for it.
        lines = (
            [] if form.manifest is None else await run_in_threadpool(parse_manifest, form.manifest)
        )
        inputs = await build_inputs(
            files=form.files, lines=lines, urls=_urls(form), defaults=defaults, settings=settings
        )
        return (
            inputs,
            defaults,
            _one(form, "webhook") or None,
            (_one(form, "open") or "").lower() in TRUE,
        )
    except BaseException:
        form.discard()
        raise


def _encode_cursor(created_at: datetime, batch_id: str) -> str:
    return base64.urlsafe_b64encode(f"{created_at.isoformat()}|{batch_id}".encode()).decode()


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        stamp, _, batch_id = base64.urlsafe_b64decode(cursor.encode()).decode().partition("|")
        return datetime.fromisoformat(stamp), batch_id
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise ServiceError(
            422, "invalid_cursor", "cursor is not one this API returned", field="cursor"
        ) from None


# ---- routes ----------------------------------------------------------------------------


@router.post("/v1/batches", response_model=BatchAccepted, status_code=201)
async def create_batch(
    request: Request,
    response: Response,
    key: CurrentKey,
    settings: SettingsDep,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> BatchAccepted:
    """Create a batch from many inputs at once; one job per input on the bulk queue. With
    ``open=true`` more inputs follow (``/files``) until ``/seal``; otherwise it is sealed now.
    The same ``Idempotency-Key`` with the same request returns the batch already made (200,
    nothing added); with a different request it is a 409 ``idempotency_key_reused``."""
    batch_key = _idempotency_key(idempotency_key)
    await check_request_rate(key.id, settings)  # before the body: a refusal costs no upload
    inputs, defaults, webhook, is_open = await _read_inputs(request, settings)
    try:
        if webhook is not None:
            webhook = await run_in_threadpool(
                check_url, webhook, field="webhook", allowlist=settings.webhook_allowlist
            )
        if not inputs and not is_open:
            raise ServiceError(
                422, "no_inputs", "a batch needs inputs (or open=true to add them later)"
            )
        fp = _fingerprint(defaults, webhook, is_open, inputs)
        made = await run_in_threadpool(
            lambda: batches.create_batch(
                api_key_id=key.id,
                idempotency_key=batch_key,
                fingerprint=fp,
                webhook_url=webhook,
                default_options=defaults,
                inputs=inputs,
                seal=not is_open,
                settings=settings,
            )
        )
    except BaseException:
        await _drop_uploads(inputs)
        raise
    if not made.created:
        await _drop_uploads(inputs)  # a replay: this request's copies of the files make no job
        response.status_code = 200
    return await run_in_threadpool(_accepted, made.batch.id, key, made.accepted)


def _fingerprint(
    defaults: dict[str, str], webhook: str | None, is_open: bool, inputs: list[batches.NewInput]
) -> str:
    """What makes two creates "the same request": what each input is (an upload by its
    content, not its fresh job id), its options and names, and the batch's own settings."""
    doc = {
        "defaults": defaults,
        "webhook": webhook,
        "open": is_open,
        "inputs": [
            [
                i.content_sha256 if i.error_code is None else None,
                i.audio_url,
                i.error_code,
                i.custom_id,
                i.source_name,
                i.idempotency_key,
                i.options,
            ]
            for i in inputs
        ],
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


async def _drop_uploads(inputs: list[batches.NewInput]) -> None:
    for item in inputs:
        if item.audio_blob is not None and item.error_code is None:
            await run_in_threadpool(drop_unclaimed, item.audio_blob)


@router.post("/v1/batches/{batch_id}/files", response_model=BatchAccepted)
async def add_to_batch(
    batch_id: str, request: Request, key: CurrentKey, settings: SettingsDep
) -> BatchAccepted:
    """Add inputs to an open batch. Inputs whose ``idempotency_key`` the batch already has
    make no new job (``duplicate: true``): resending a chunk is always safe."""
    await check_request_rate(key.id, settings)
    defaults = await run_in_threadpool(_check_owned, batch_id, key)
    inputs, _, _, _ = await _read_inputs(request, settings, batch_defaults=defaults)
    try:
        accepted = await run_in_threadpool(
            lambda: batches.add_inputs(
                batch_id=batch_id, api_key_id=key.id, inputs=inputs, settings=settings
            )
        )
    except BaseException:
        for item in inputs:
            if item.audio_blob is not None and item.error_code is None:
                await run_in_threadpool(drop_unclaimed, item.audio_blob)
        raise
    return await run_in_threadpool(_accepted, batch_id, key, accepted)


def _check_owned(batch_id: str, key: ApiKey) -> dict[str, str]:
    """404 unless the key's; returns the batch's default options."""
    with get_sessionmaker()() as session:
        batch = batches.owned_batch(session, batch_id=batch_id, api_key_id=key.id)
        return dict(batch.default_options)


@router.post("/v1/batches/{batch_id}/seal", response_model=BatchOut)
def seal_batch(batch_id: str, key: CurrentKey) -> BatchOut:
    """No more inputs: the batch ends (and its webhook fires) when its last job does."""
    batches.seal(batch_id=batch_id, api_key_id=key.id)
    return load_batch_out(batch_id, key)


@router.get("/v1/batches/{batch_id}", response_model=BatchOut)
def get_batch(batch_id: str, key: CurrentKey) -> BatchOut:
    return load_batch_out(batch_id, key)


@router.get(
    "/v1/batches/{batch_id}/deliveries",
    response_model=schemas.DeliveryList,
    summary="Webhook deliveries of a batch's own event, with every attempt",
)
def batch_deliveries(batch_id: str, key: CurrentKey) -> schemas.DeliveryList:
    """The batch's ended event (sent once, when the batch ends, canceled ones included):
    its own delivery, not one of its jobs' (those are under ``/v1/jobs/{id}/deliveries``)."""
    with get_sessionmaker()() as session:
        batch = batches.owned_batch(session, batch_id=batch_id, api_key_id=key.id)
        rows = session.scalars(
            select(WebhookDelivery)
            .where(WebhookDelivery.batch_id == batch.id, WebhookDelivery.job_id.is_(None))
            .order_by(WebhookDelivery.created_at)
        ).all()
        return schemas.DeliveryList(request_id=batch.id, deliveries=[delivery_out(d) for d in rows])


@router.post("/v1/batches/{batch_id}/cancel", response_model=BatchCanceled)
def cancel_batch(batch_id: str, key: CurrentKey, settings: SettingsDep) -> BatchCanceled:
    """Queued jobs are canceled at once; running ones are asked to stop and end canceled
    (or finish, if they were about to). The batch takes no more inputs."""
    done = batches.cancel(batch_id=batch_id, api_key_id=key.id, settings=settings)
    return BatchCanceled(
        batch=load_batch_out(batch_id, key),
        canceled_jobs=done.canceled_jobs,
        cancel_requested=done.cancel_requested,
    )


@router.get("/v1/batches", response_model=BatchList)
def list_batches(
    key: CurrentKey,
    settings: SettingsDep,
    limit: Annotated[int, Query(ge=1)] = 20,
    cursor: str | None = None,
) -> BatchList:
    """This key's batches, newest first; pass ``next_cursor`` back for the next page."""
    limit = min(limit, settings.batch_list_max_limit)
    with get_sessionmaker()() as session:
        query = select(Batch).where(Batch.api_key_id == key.id)
        if cursor:
            query = query.where(tuple_(Batch.created_at, Batch.id) < _decode_cursor(cursor))
        rows = list(
            session.scalars(
                query.order_by(Batch.created_at.desc(), Batch.id.desc()).limit(limit + 1)
            ).all()
        )
        page = rows[:limit]
        data = [batch_out(b, batches.stats(session, b.id)) for b in page]
    more = len(rows) > limit
    return BatchList(
        data=data, next_cursor=_encode_cursor(page[-1].created_at, page[-1].id) if more else None
    )


def _result_line(job: Job) -> dict[str, Any]:
    result = job.result if job.status == JobStatus.succeeded else None
    error = None
    if job.error_code is not None:
        error = {"code": job.error_code, "message": job.error_message or ""}
    return ResultLine(
        custom_id=job.custom_id,
        job_id=job.id,
        source_name=job.source_name,
        status=job.status,
        text=result["text"] if result else None,
        segments=result["segments"] if result else None,
        language=result["language"] if result else None,
        input_length_ms=job.input_length_ms,
        runtime_ms=job.runtime_ms,
        cost=job.cost,
        error=ResultError(**error) if error else None,
    ).model_dump()


def _input_line(job: Job) -> dict[str, Any]:
    return InputLine(
        job_id=job.id,
        custom_id=job.custom_id,
        source_name=job.source_name,
        idempotency_key=job.idempotency_key,
        content_sha256=job.content_sha256,
        status=job.status,
    ).model_dump()


def results_jsonl(batch_id: str, settings: Settings, status: str | None = None) -> Iterator[bytes]:
    """The batch's results as ``GET /v1/batches/{id}/results`` streams them (the pages'
    download too)."""
    return _stream(batch_id, _result_line, settings, status)


def results_text(batch_id: str, settings: Settings) -> Iterator[bytes]:
    """Each input's name and transcript (or why it has none), in submission order."""
    for page in batches.iter_jobs(batch_id, page_size=settings.batch_results_page_size):
        for job in page:
            name = job.custom_id or job.source_name or job.id
            if job.status == JobStatus.succeeded and job.result:
                body = str(job.result.get("text", "")).strip()
            else:
                body = f"({job.status}{': ' + job.error_code if job.error_code else ''})"
            yield f"== {name}\n{body}\n\n".encode()


def _stream(batch_id: str, line: Any, settings: Settings, status: str | None) -> Iterator[bytes]:
    for page in batches.iter_jobs(
        batch_id, page_size=settings.batch_results_page_size, status=status
    ):
        yield b"".join(json.dumps(line(j)).encode() + b"\n" for j in page)


StatusFilter = Annotated[
    Literal["queued", "running", "succeeded", "failed", "canceled"] | None, Query()
]


@router.get(
    "/v1/batches/{batch_id}/results",
    response_class=StreamingResponse,
    response_model=None,
    responses=jsonl_doc(ResultLine),
)
def batch_results(
    batch_id: str, key: CurrentKey, settings: SettingsDep, status: StatusFilter = None
) -> StreamingResponse:
    """One JSON line per job (``ResultLine``), in submission order, streamed page by page."""
    _check_owned(batch_id, key)
    return StreamingResponse(_stream(batch_id, _result_line, settings, status), media_type=JSONL)


@router.get(
    "/v1/batches/{batch_id}/inputs",
    response_class=StreamingResponse,
    response_model=None,
    responses=jsonl_doc(InputLine),
)
def batch_inputs(
    batch_id: str, key: CurrentKey, settings: SettingsDep, status: StatusFilter = None
) -> StreamingResponse:
    """What the batch has accepted (``InputLine``): a resuming client skips these."""
    _check_owned(batch_id, key)
    return StreamingResponse(_stream(batch_id, _input_line, settings, status), media_type=JSONL)
