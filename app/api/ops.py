"""Operating the API: /healthz, /readyz, /metrics, offline /docs, and an access log whose
lines carry the request id (the caller's X-Request-ID, or a fresh one)."""

from __future__ import annotations

import hmac
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.errors import ErrorCode, ServiceError
from app.infra.logging import request_id_var
from app.infra.metrics import api_registry
from app.settings import Settings, get_settings

log = logging.getLogger("whisperq.api")
router = APIRouter()
SWAGGER_STATIC = "/static/swagger"


class Health(BaseModel):
    ok: bool


class Readiness(BaseModel):
    ok: bool
    checks: dict[str, str]


@router.get("/healthz", response_model=Health)
def healthz() -> Health:
    return Health(ok=True)


def readiness(settings: Settings) -> Readiness:
    checks: dict[str, str] = {}
    try:
        from sqlalchemy import text

        from app.infra.db import get_engine

        with get_engine().connect() as conn:
            conn.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"unreachable ({type(exc).__name__})"
    try:
        import redis

        client = redis.Redis.from_url(settings.redis_url, socket_timeout=2)
        try:
            client.ping()
        finally:
            client.close()
        checks["redis"] = "ok"
    except Exception as exc:
        checks["redis"] = f"unreachable ({type(exc).__name__})"
    return Readiness(ok=all(v == "ok" for v in checks.values()), checks=checks)


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
async def readyz() -> JSONResponse:
    ready = await run_in_threadpool(readiness, get_settings())
    return JSONResponse(ready.model_dump(), status_code=200 if ready.ok else 503)


_registry: CollectorRegistry | None = None


def _check_metrics_access(request: Request, settings: Settings) -> None:
    """/metrics tells anyone the service's load, queues and failure rates: with
    WHISPERQ_METRICS_TOKEN set it answers only that bearer token; unset, only outside
    production."""
    token = settings.metrics_token.get_secret_value() if settings.metrics_token else ""
    if not token:
        if settings.environment == "production":
            # Off, not "loopback only": behind a reverse proxy on the same host every caller
            # comes from loopback, and behind Docker's port publishing none does, so the
            # peer address would either let everyone in or no one. A 404 fails closed and
            # looks like any unknown path.
            raise StarletteHTTPException(404)
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        given.strip().encode(), token.encode()
    ):
        raise ServiceError.of(
            ErrorCode.unauthorized, "/metrics needs Authorization: Bearer <WHISPERQ_METRICS_TOKEN>"
        )


@router.get("/metrics", response_class=Response, include_in_schema=False)
async def metrics(
    request: Request, settings: Annotated[Settings, Depends(get_settings)]
) -> Response:
    _check_metrics_access(request, settings)
    global _registry
    if _registry is None:
        _registry = api_registry(get_settings())
    body = await run_in_threadpool(generate_latest, _registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


def _clean_request_id(value: str | None) -> str:
    if value and len(value) <= 64 and value.replace("-", "").isalnum():
        return value
    return uuid.uuid4().hex


def install_ops(app: FastAPI) -> None:
    """Routes, the access log middleware, and Swagger UI served from this process."""
    app.include_router(router)

    @app.middleware("http")
    async def access_log(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        rid = _clean_request_id(request.headers.get("x-request-id"))
        token = request_id_var.set(rid)
        start = time.perf_counter()
        try:
            response = await call_next(request)
        finally:
            request_id_var.reset(token)
        response.headers.setdefault("x-request-id", rid)  # OpenAI routes set their job id
        if request.url.path not in ("/metrics", "/healthz", "/readyz"):
            route = request.scope.get("route")
            log.info(
                "%s %s %d",
                request.method,
                getattr(route, "path", request.url.path),
                response.status_code,
                extra={
                    "request_id": rid,
                    "event": "http_request",
                    "ms": round((time.perf_counter() - start) * 1000, 1),
                },
            )
        return response

    try:
        # fastapi-offline ships Swagger UI 5 (OpenAPI 3.1, which FastAPI emits) as files.
        import fastapi_offline

        assets: Path | None = Path(fastapi_offline.__file__).parent / "static"
    except ImportError:  # pragma: no cover (a dependency; CDN fallback keeps /docs alive)
        assets = None
    if assets is not None:
        app.mount(SWAGGER_STATIC, StaticFiles(directory=assets), name="swagger")

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        kwargs: dict[str, Any] = {}
        if assets is not None:
            kwargs = {
                "swagger_js_url": f"{SWAGGER_STATIC}/swagger-ui-bundle.js",
                "swagger_css_url": f"{SWAGGER_STATIC}/swagger-ui.css",
                "swagger_favicon_url": f"{SWAGGER_STATIC}/favicon.png",
            }
        return get_swagger_ui_html(openapi_url="/openapi.json", title="whisperq API", **kwargs)
