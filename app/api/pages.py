"""Pages for people: a job (status, transcript with timestamps, audio, cost, delivery log),
a key's recent batches with their progress and its recent jobs, and one batch's jobs,
rendered on the server (Jinja2, no build step, no script needed).

Two ways in, neither puts the API key in a URL:
- a session cookie, set by POST /login with the key; it holds the key's prefix, an expiry, a
  random session id and an HMAC over them and the key's stored hash (so revoking or replacing
  the key ends it). The session id is also kept in Redis until it expires or the person signs
  out: a signed cookie alone would stay valid after sign-out for anyone who copied it;
- a signed link to one job (``POST /v1/jobs/{id}/link``), shareable, expiring.

Browsers get security headers on every answer and a cross-origin guard on every form post:
see :func:`install_browser_guards`.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import secrets
import time
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlsplit

import redis
from fastapi import APIRouter, Cookie, FastAPI, Form, Query, Request
from fastapi.responses import (
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from jinja2 import Environment, FileSystemLoader, select_autoescape
from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.batches import results_jsonl, results_text
from app.api.deps import CurrentKey, SessionDep, SettingsDep, owned_job
from app.errors import ErrorCode, ServiceError
from app.infra import blobs
from app.infra.db import utcnow
from app.infra.models import ApiKey, Batch, Job, JobStatus, WebhookDelivery
from app.jobs import batches
from app.jobs.keys import authenticate
from app.settings import Settings

router = APIRouter()
COOKIE = "whisperq_session"
SESSION_TTL_S = 12 * 3600
RECENT_JOBS = 50
RECENT_BATCHES = 20
BATCH_JOBS_SHOWN = 200  # a batch may hold 20 000 jobs: the rest are in its JSONL results
_env = Environment(
    loader=FileSystemLoader(Path(__file__).parent / "templates"),
    autoescape=select_autoescape(["html"]),
)


class JobLink(BaseModel):
    url: str
    expires_at: int


def _sign(settings: Settings, *parts: str) -> str:
    msg = "\x1f".join(parts).encode()
    return hmac.new(settings.key_pepper.encode(), msg, hashlib.sha256).hexdigest()


def job_link_token(
    settings: Settings, job_id: str, *, now: float | None = None, base_url: str = ""
) -> JobLink:
    expires = int((time.time() if now is None else now) + settings.page_link_ttl_s)
    sig = _sign(settings, "job-link", job_id, str(expires))
    url = f"{base_url.rstrip('/')}/jobs/{job_id}?token={expires}.{sig}"
    return JobLink(url=url, expires_at=expires)


def _link_ok(settings: Settings, job_id: str, token: str | None) -> bool:
    expires, _, sig = (token or "").partition(".")
    if not expires.isdigit() or int(expires) < time.time():
        return False
    return hmac.compare_digest(sig, _sign(settings, "job-link", job_id, expires))


SESSIONS = "whisperq:page-session"


@lru_cache(maxsize=4)
def _redis(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)


def _parse_cookie(value: str | None) -> tuple[str, str, str, str] | None:
    """(prefix, expires, session id, signature) of an unexpired cookie, or None."""
    parts = (value or "").split(".")
    if len(parts) != 4 or not all(parts) or not parts[1].isdigit():
        return None
    prefix, expires, sid, sig = parts
    return None if int(expires) < time.time() else (prefix, expires, sid, sig)


def start_session(settings: Settings, key: ApiKey) -> str:
    """A new session for ``key``: kept in Redis (so signing out can end it), and its cookie."""
    sid = secrets.token_urlsafe(18)
    expires = str(int(time.time()) + SESSION_TTL_S)
    _redis(settings.redis_url).set(f"{SESSIONS}:{sid}", key.prefix, ex=SESSION_TTL_S)
    sig = _sign(settings, "session", key.prefix, expires, sid, key.secret_hash)
    return f"{key.prefix}.{expires}.{sid}.{sig}"


def end_session(settings: Settings, value: str | None) -> None:
    if (parsed := _parse_cookie(value)) is not None:
        _redis(settings.redis_url).delete(f"{SESSIONS}:{parsed[2]}")


def key_from_cookie(session: Session, settings: Settings, value: str | None) -> ApiKey | None:
    if (parsed := _parse_cookie(value)) is None:
        return None
    prefix, expires, sid, sig = parsed
    key = session.scalars(select(ApiKey).where(ApiKey.prefix == prefix)).one_or_none()
    if key is None or key.revoked_at is not None:
        return None
    want = _sign(settings, "session", prefix, expires, sid, key.secret_hash)
    if not hmac.compare_digest(sig, want):
        return None
    # Fails closed: a session Redis no longer holds (signed out, or Redis emptied) is over.
    held = _redis(settings.redis_url).get(f"{SESSIONS}:{sid}")
    return key if held == prefix.encode() else None


MAGIC_TYPES = (
    (b"RIFF", "audio/wav"),
    (b"OggS", "audio/ogg"),
    (b"fLaC", "audio/flac"),
    (b"ID3", "audio/mpeg"),
    (b"\xff\xfb", "audio/mpeg"),
    (b"\x1aE\xdf\xa3", "audio/webm"),
)


def sniff_audio_type(head: bytes) -> str:
    """The player needs a media type; uploads carry none we trust, so read the magic."""
    for magic, media_type in MAGIC_TYPES:
        if head.startswith(magic):
            return media_type
    return "audio/mp4" if head[4:8] == b"ftyp" else "application/octet-stream"


# The pages run no script; their one inline <style> carries a per-response nonce, so an
# injected <style> or <script> (say, through a transcript or a file name) never runs.
PAGE_CSP = (
    "default-src 'none'; style-src 'nonce-{nonce}'; img-src 'self'; media-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
# JSON, audio, exports: nothing to load, nothing may frame them.
DEFAULT_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'"
# Swagger UI starts itself with an inline script (FastAPI's get_swagger_ui_html).
DOCS_CSP = "frame-ancestors 'none'"
SECURITY_HEADERS = (
    ("x-content-type-options", "nosniff"),
    ("x-frame-options", "DENY"),
    # Same-origin only: a job page's URL may hold a signed link token.
    ("referrer-policy", "same-origin"),
)


def _html(name: str, status: int = 200, **context: Any) -> HTMLResponse:
    nonce = secrets.token_urlsafe(16)
    return HTMLResponse(
        _env.get_template(name).render(csp_nonce=nonce, **context),
        status_code=status,
        headers={"content-security-policy": PAGE_CSP.format(nonce=nonce)},
    )


def _fmt_time(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S UTC") if value else "–"


def _clock(seconds: float) -> str:
    m, s = divmod(max(seconds, 0.0), 60)
    return f"{int(m):02d}:{s:05.2f}"


_env.filters["when"] = _fmt_time
_env.filters["clock"] = _clock


def _login_page(next_url: str, status: int = 200, error: str = "") -> HTMLResponse:
    return _html("login.html", status, next_url=next_url, error=error)


def _safe_next(value: str) -> str:
    # Only our own pages: never an open redirect.
    return value if value.startswith("/jobs") and "//" not in value else "/jobs"


@router.get("/login", response_class=HTMLResponse, include_in_schema=False)
def login_form(next: str = "/jobs") -> HTMLResponse:
    return _login_page(_safe_next(next))


@router.post("/login", response_class=HTMLResponse, include_in_schema=False)
def login(
    session: SessionDep,
    settings: SettingsDep,
    request: Request,
    api_key: Annotated[str, Form()],
    next: Annotated[str, Form()] = "/jobs",
) -> Response:
    key = authenticate(session, presented=api_key.strip(), pepper=settings.key_pepper)
    if key is None:
        return _login_page(_safe_next(next), 401, "unknown or revoked API key")
    response = RedirectResponse(_safe_next(next), status_code=303)
    response.set_cookie(
        COOKIE,
        start_session(settings, key),
        max_age=SESSION_TTL_S,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return response


@router.post("/logout", include_in_schema=False)
def logout(
    settings: SettingsDep,
    request: Request,
    whisperq_session: Annotated[str | None, Cookie()] = None,
) -> Response:
    end_session(settings, whisperq_session)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(
        COOKIE, httponly=True, samesite="strict", secure=request.url.scheme == "https"
    )
    return response


@router.post(
    "/v1/jobs/{job_id}/link",
    response_model=JobLink,
    tags=["jobs"],
    summary="A shareable link to the job's page",
)
def make_job_link(
    job_id: str, key: CurrentKey, session: SessionDep, settings: SettingsDep, request: Request
) -> JobLink:
    """A link to the job's page that works without the key, until it expires. Absolute, on
    the address this request came to (behind a proxy: run uvicorn with --proxy-headers and
    have the proxy pass the Host header on)."""
    job = owned_job(session, job_id=job_id, key=key)
    return job_link_token(settings, job.id, base_url=str(request.base_url))


def _viewer(
    session: Session, settings: Settings, job_id: str, cookie: str | None, token: str | None
) -> Job | None:
    if token is not None and job_id.isalnum() and _link_ok(settings, job_id, token):
        return session.get(Job, job_id)
    key = key_from_cookie(session, settings, cookie)
    if key is None:
        return None
    try:
        return owned_job(session, job_id=job_id, key=key)
    except ServiceError:
        return None


@router.get("/jobs/{job_id}", response_class=HTMLResponse, include_in_schema=False)
def job_page(
    job_id: str,
    session: SessionDep,
    settings: SettingsDep,
    token: Annotated[str | None, Query()] = None,
    whisperq_session: Annotated[str | None, Cookie()] = None,
) -> Response:
    job = _viewer(session, settings, job_id, whisperq_session, token)
    if job is None:
        if whisperq_session is None and token is None:
            return RedirectResponse(f"/login?next={quote('/jobs/' + job_id)}", status_code=303)
        return _html("missing.html", 404, job_id=job_id)
    deliveries = session.scalars(
        select(WebhookDelivery)
        .where(WebhookDelivery.job_id == job.id)
        .order_by(WebhookDelivery.created_at)
    ).all()
    has_audio = job.audio_blob is not None and blobs.get_store().size(job.audio_blob) is not None
    audio_url = f"/jobs/{job.id}/audio" + (f"?token={quote(token)}" if token else "")
    return _html(
        "job.html",
        job=job,
        segments=(job.result or {}).get("segments", []),
        text=(job.result or {}).get("text", ""),
        deliveries=deliveries,
        has_audio=has_audio,
        audio_url=audio_url,
        refresh=job.status in ("queued", "running"),
    )


@router.get("/jobs/{job_id}/audio", include_in_schema=False)
def job_audio(
    job_id: str,
    session: SessionDep,
    settings: SettingsDep,
    token: Annotated[str | None, Query()] = None,
    whisperq_session: Annotated[str | None, Cookie()] = None,
) -> Response:
    job = _viewer(session, settings, job_id, whisperq_session, token)
    if job is None or job.audio_blob is None:
        raise ServiceError(404, "audio_not_found", "no audio for this job (deleted after the job)")
    store = blobs.get_store()
    size = store.size(job.audio_blob)
    if size is None:
        raise ServiceError(404, "audio_not_found", "no audio for this job (deleted after the job)")
    chunks = store.iter_bytes(job.audio_blob)
    first = next(chunks, b"")
    return StreamingResponse(
        itertools.chain([first], chunks),
        media_type=sniff_audio_type(first),
        headers={"content-length": str(size), "cache-control": "private, max-age=300"},
    )


@router.get("/jobs/batches/{batch_id}/results.{fmt}", include_in_schema=False)
def batch_download(
    batch_id: str,
    fmt: str,
    session: SessionDep,
    settings: SettingsDep,
    whisperq_session: Annotated[str | None, Cookie()] = None,
) -> Response:
    """A finished (or running) batch from its page: every result as JSON lines, or every
    transcript as text, under the batch's name."""
    key = key_from_cookie(session, settings, whisperq_session)
    if key is None:
        return RedirectResponse(f"/login?next={quote('/jobs?batch=' + batch_id)}", 303)
    if fmt not in ("jsonl", "txt"):
        raise ServiceError.of(ErrorCode.not_found, "results come as .jsonl or .txt")
    try:
        batches.owned_batch(session, batch_id=batch_id, api_key_id=key.id)
    except ServiceError:
        return _html("missing.html", 404, job_id=batch_id, what="batch")
    body = results_jsonl(batch_id, settings) if fmt == "jsonl" else results_text(batch_id, settings)
    return StreamingResponse(
        body,
        media_type="application/jsonl" if fmt == "jsonl" else "text/plain; charset=utf-8",
        headers={"content-disposition": f'attachment; filename="batch-{batch_id}.{fmt}"'},
    )


@dataclass(frozen=True)
class BatchRow:
    """One batch as the list shows it: the API's own numbers (app.jobs.batches.stats)."""

    batch: Batch
    status: str
    stats: batches.Stats
    percent: float  # finished jobs / all jobs, as GET /v1/batches/{id} reports progress
    eta_s: float | None

    @property
    def unfinished(self) -> bool:
        return self.batch.finished_at is None


def batch_row(session: Session, batch: Batch, *, now: datetime) -> BatchRow:
    s = batches.stats(session, batch.id)
    return BatchRow(
        batch=batch,
        status=batches.status_of(batch),
        stats=s,
        percent=100.0 * s.finished / s.total if s.total else 0.0,
        eta_s=batches.eta(s, now=now).eta_s,
    )


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    minutes, s = divmod(round(seconds), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours}:{m:02d}:{s:02d}" if hours else f"{m}:{s:02d}"


_env.filters["duration"] = _duration


@router.get("/jobs", response_class=HTMLResponse, include_in_schema=False)
def jobs_page(
    session: SessionDep,
    settings: SettingsDep,
    whisperq_session: Annotated[str | None, Cookie()] = None,
    batch: Annotated[str | None, Query(max_length=64)] = None,
    status: Annotated[str | None, Query(max_length=16)] = None,
) -> Response:
    key = key_from_cookie(session, settings, whisperq_session)
    if key is None:
        where = "/jobs" + (f"?batch={quote(batch)}" if batch else "")
        return RedirectResponse(f"/login?next={quote(where)}", status_code=303)
    if status is not None and status not in {str(s) for s in JobStatus}:
        status = None  # an unknown filter shows everything rather than nothing
    now = utcnow()
    if batch is not None:
        return _batch_page(session, key, batch, status, now)
    recent = session.scalars(
        select(Batch)
        .where(Batch.api_key_id == key.id)
        .order_by(Batch.created_at.desc())
        .limit(RECENT_BATCHES)
    ).all()
    rows = [batch_row(session, b, now=now) for b in recent]
    # Batch jobs are reached through their batch: one large batch would otherwise push
    # every single submission off this list.
    jobs = session.scalars(
        select(Job)
        .where(Job.api_key_id == key.id, Job.batch_id.is_(None))
        .order_by(Job.created_at.desc())
        .limit(RECENT_JOBS)
    ).all()
    busy = any(r.unfinished for r in rows) or any(j.status in batches.UNFINISHED for j in jobs)
    return _html("jobs.html", key=key, batches=rows, jobs=jobs, refresh=busy)


def _batch_page(
    session: Session, key: ApiKey, batch_id: str, status: str | None, now: datetime
) -> Response:
    try:
        batch = batches.owned_batch(session, batch_id=batch_id, api_key_id=key.id)
    except ServiceError:
        return _html("missing.html", 404, job_id=batch_id, what="batch")
    row = batch_row(session, batch, now=now)
    query = select(Job).where(Job.batch_id == batch.id)
    if status is not None:
        query = query.where(Job.status == status)
    jobs = session.scalars(query.order_by(Job.created_at, Job.id).limit(BATCH_JOBS_SHOWN)).all()
    shown_of = row.stats.counts[status] if status is not None else row.stats.total
    return _html(
        "batch.html",
        key=key,
        row=row,
        jobs=jobs,
        only=status,
        shown_of=shown_of,
        refresh=row.unfinished,
    )


# --- browser guards ------------------------------------------------------------------------

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
API_PREFIX = "/v1/"  # bearer-key routes: a cross-site form can neither set nor send a key


def cross_origin_refusal(method: str, path: str, headers: Headers) -> str | None:
    """Why a state-changing request to a page must be refused as cross-origin, or None.

    The browser says where a request comes from: Sec-Fetch-Site (every current browser), else
    Origin (sent on every POST since 2020), compared with the Host it was sent to; ``null``
    (a sandboxed or no-referrer page) never matches. A request with neither is not a browser's
    (curl, a test client), and a cross-site page cannot make a browser omit both. So a forged
    sign-in (the attacker's key in the victim's browser) or sign-out is refused, with no token
    in the forms and no cookie before sign-in. Go's http.CrossOriginProtection checks the same.
    """
    if method in SAFE_METHODS or path.startswith(API_PREFIX):
        return None
    site = headers.get("sec-fetch-site")
    if site is not None:
        return None if site in ("same-origin", "none") else f"a {site} request"
    origin = headers.get("origin")
    if origin is None:
        return None
    host = (headers.get("host") or "").lower()
    if host and urlsplit(origin).netloc.lower() == host:
        return None
    return f"a request from origin {origin[:100]!r}"


def _headers_for(path: str, headers: MutableHeaders) -> None:
    for name, value in SECURITY_HEADERS:
        headers.setdefault(name, value)
    headers.setdefault("content-security-policy", DOCS_CSP if path == "/docs" else DEFAULT_CSP)


class BrowserGuards:
    """Plain ASGI, so streamed answers (audio, JSONL) pass through untouched."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]

        async def send_guarded(message: Message) -> None:
            if message["type"] == "http.response.start":
                _headers_for(path, MutableHeaders(scope=message))
            await send(message)

        reason = cross_origin_refusal(scope["method"], path, Headers(scope=scope))
        if reason is not None:
            err = ServiceError.of(
                ErrorCode.cross_origin_request,
                f"refused {reason}: submit this site's forms from its own pages",
            )
            response = JSONResponse(err.body(), status_code=err.status)
            await response(scope, receive, send_guarded)
            return
        await self.app(scope, receive, send_guarded)


def install_browser_guards(app: FastAPI) -> None:
    app.add_middleware(BrowserGuards)
