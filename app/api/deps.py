"""FastAPI dependencies: a DB session per unit of work, the caller's API key, the completion
listener."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, FastAPI
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from app.errors import ServiceError
from app.infra.db import get_sessionmaker
from app.infra.models import ApiKey, Job
from app.infra.notify import CompletionListener
from app.jobs.keys import authenticate
from app.settings import Settings, get_settings


def get_db() -> Iterator[Session]:
    with get_sessionmaker()() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_db)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


# Declared as a security scheme (not a plain header) so /openapi.json names it and Swagger UI
# offers "Authorize"; auto_error is off because FastAPI's own refusal is a 403 in its shape.
bearer = HTTPBearer(auto_error=False, description="an API key: `Authorization: bearer <key>`")


def presented_key(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> str:
    token = credentials.credentials.strip() if credentials is not None else ""
    if not token:
        raise ServiceError(401, "unauthorized", "send 'Authorization: bearer <api key>'")
    return token


def current_key(settings: SettingsDep, token: Annotated[str, Depends(presented_key)]) -> ApiKey:
    # Its own short session, closed before the route runs: a request that then reads an
    # upload or waits for a transcript must not hold a pooled connection all that time.
    with get_sessionmaker()() as session:
        key = authenticate(session, presented=token, pepper=settings.key_pepper)
        if key is None:
            raise ServiceError(401, "unauthorized", "unknown or revoked API key")
        session.expunge(key)
    return key


CurrentKey = Annotated[ApiKey, Depends(current_key)]


def completion_listener(app: FastAPI) -> CompletionListener:
    """The process's one completion subscription (started by the lifespan, or lazily by the
    first sync caller when the app runs without one)."""
    listener: CompletionListener | None = getattr(app.state, "completions", None)
    if listener is None:
        listener = CompletionListener(get_settings().redis_url)
        app.state.completions = listener
    listener.start()
    return listener


def owned_job(session: Session, *, job_id: str, key: ApiKey) -> Job:
    """Another tenant's job is indistinguishable from a missing one: 404, never 403."""
    job = session.get(Job, job_id) if job_id.isalnum() else None
    if job is None or job.api_key_id != key.id:
        raise ServiceError(404, "job_not_found", f"no job {job_id!r}")
    return job
