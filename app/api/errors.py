"""The HTTP side of :mod:`app.errors`: one error shape for every 4xx/5xx, in OpenAI's form
under :data:`OPENAI_PATH_PREFIX`, and the handlers that answer with it.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.errors import ErrorCode, ServiceError

OPENAI_PATH_PREFIX = "/v1/audio/"


def _respond(request: Request, err: ServiceError) -> JSONResponse:
    headers = dict(err.headers)
    if err.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if request.url.path.startswith(OPENAI_PATH_PREFIX):
        if err.status == 409 or err.code == ErrorCode.job_still_running:
            # The official client retries 409 and 5xx by default; a retry here would
            # resubmit a job (or hit the same conflict), so tell it not to.
            headers.setdefault("x-should-retry", "false")
        return JSONResponse(err.openai_body(), status_code=err.openai_status(), headers=headers)
    return JSONResponse(err.body(), status_code=err.status, headers=headers or None)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _api_error(request: Request, exc: ServiceError) -> JSONResponse:
        return _respond(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
        err = ServiceError.of(
            ErrorCode.invalid_request,
            str(first.get("msg", "invalid request")),
            field=".".join(loc) or None,
        )
        return _respond(request, err)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: ErrorCode.not_found, 405: ErrorCode.method_not_allowed}.get(
            exc.status_code, ErrorCode.http_error
        )
        err = ServiceError(exc.status_code, code, str(exc.detail), headers=dict(exc.headers or {}))
        return _respond(request, err)
