"""``Idempotency-Key`` on submissions: the same key and request give the same job.

The key is reserved in its own committed row *before* the job is submitted, so two
concurrent requests with one key cannot both create a job: the second sees the reservation
(409 while the first is still submitting, the first's job once it has one). A submission
refused by validation releases the key, so the caller can fix the request and retry with it.
A different request under a used key is a 409. Keys expire after ``idempotency_ttl_s``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, update
from sqlalchemy.exc import IntegrityError

from app.errors import ErrorCode, ServiceError
from app.infra import blobs
from app.infra.db import session_scope, utcnow
from app.infra.models import IdempotencyKey, Job
from app.jobs.submission import AudioInput

HEADER = "Idempotency-Key"
MAX_KEY_CHARS = 255
HEADER_DOC = (
    "Optional. The same key with the same request returns the same job (and answers with "
    "'Idempotent-Replayed: true'); the same key with a different request is a 409. "
    f"Keys are scoped to the API key, up to {MAX_KEY_CHARS} printable ASCII characters, "
    "and expire after 24 hours."
)


@dataclass(frozen=True)
class Submitted:
    job: Job
    replayed: bool


def fingerprint(route: str, params: Mapping[str, Any], audio: AudioInput) -> str:
    """What makes two requests "the same": the route, the parsed parameters and the audio."""
    doc = {
        "route": route,
        "params": dict(params),
        "audio_sha256": (
            hashlib.sha256(audio.data).hexdigest() if audio.data is not None else audio.sha256
        ),
        "audio_url": audio.url,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def check_key(raw: str | None) -> str | None:
    if raw is None:
        return None
    if not 1 <= len(raw) <= MAX_KEY_CHARS or not all(33 <= ord(c) <= 126 for c in raw):
        raise ServiceError.of(
            ErrorCode.invalid_idempotency_key,
            f"{HEADER} must be 1 to {MAX_KEY_CHARS} printable ASCII characters without spaces",
            field=HEADER,
        )
    return raw


def _reserve(api_key_id: int, key: str, fp: str, ttl_s: float) -> Job | None:
    """Reserve the key for this request (None), or return the job it already stands for."""
    for _ in range(3):  # a concurrent insert of the same key: read it on the next turn
        try:
            with session_scope() as session:
                now = utcnow()
                session.execute(
                    delete(IdempotencyKey).where(
                        IdempotencyKey.api_key_id == api_key_id, IdempotencyKey.expires_at <= now
                    )
                )
                row = session.get(IdempotencyKey, (api_key_id, key))
                if row is None:
                    session.add(
                        IdempotencyKey(
                            api_key_id=api_key_id,
                            key=key,
                            fingerprint=fp,
                            created_at=now,
                            expires_at=now + timedelta(seconds=ttl_s),
                        )
                    )
                    session.flush()
                    return None
                if row.fingerprint != fp:
                    raise ServiceError.of(
                        ErrorCode.idempotency_key_reused,
                        f"this {HEADER} was used with a different request",
                        field=HEADER,
                    )
                job = session.get(Job, row.job_id) if row.job_id is not None else None
                if job is None:
                    raise ServiceError.of(
                        ErrorCode.idempotency_key_in_use,
                        f"a request with this {HEADER} is still being submitted; retry shortly",
                        field=HEADER,
                    )
                return job
        except IntegrityError:
            continue
    raise ServiceError.of(
        ErrorCode.idempotency_key_in_use, f"this {HEADER} is contended; retry", field=HEADER
    )


def _attach(api_key_id: int, key: str, job_id: str) -> None:
    with session_scope() as session:
        session.execute(
            update(IdempotencyKey)
            .where(IdempotencyKey.api_key_id == api_key_id, IdempotencyKey.key == key)
            .values(job_id=job_id)
        )


def _release(api_key_id: int, key: str) -> None:
    with session_scope() as session:
        session.execute(
            delete(IdempotencyKey).where(
                IdempotencyKey.api_key_id == api_key_id,
                IdempotencyKey.key == key,
                IdempotencyKey.job_id.is_(None),
            )
        )


def submit_once(
    *,
    api_key_id: int,
    key: str | None,
    fingerprint: str,
    submit: Callable[[], Job],
    ttl_s: float,
    upload: str | None = None,
) -> Submitted:
    """Run ``submit`` at most once per (API key, idempotency key). ``key`` is the header as
    sent (checked here). ``upload``, the blob this request already streamed in, is deleted
    if the key refuses the request: no job will ever name it. Blocking: call it from a
    worker thread."""
    try:
        key = check_key(key)
        existing = None if key is None else _reserve(api_key_id, key, fingerprint, ttl_s)
    except ServiceError:
        if upload is not None:
            blobs.delete_blob(upload)
        raise
    if key is None:
        return Submitted(submit(), replayed=False)
    if existing is not None:
        return Submitted(existing, replayed=True)
    try:
        job = submit()
    except BaseException:
        # Refused (bad audio, broker down...): the key is free again for a corrected retry.
        _release(api_key_id, key)
        raise
    _attach(api_key_id, key, job.id)
    return Submitted(job, replayed=False)
