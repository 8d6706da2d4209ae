"""Infrastructure outages as answers a client can act on: Postgres or Redis unreachable (or the
pool exhausted) is a JSON 503 with Retry-After, never a plain-text 500; anything else
unexpected is a JSON 500 that names no internals."""

from __future__ import annotations

import logging

import redis
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from kombu.exceptions import OperationalError as BrokerError
from sqlalchemy import exc as sa_exc

from app.errors import ServiceError
from app.settings import get_settings

log = logging.getLogger(__name__)

# Connection-level failures only: a constraint violation is a bug, not an outage.
DATABASE_DOWN = (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError)
QUEUE_DOWN = (redis.ConnectionError, redis.TimeoutError, BrokerError)


def _unavailable(code: str, message: str) -> JSONResponse:
    retry_after = get_settings().retry_after_s
    return JSONResponse(
        ServiceError(503, code, message).body(),
        status_code=503,
        headers={"Retry-After": str(retry_after)},
    )


def install_outage_handlers(app: FastAPI) -> None:
    async def database_down(_: Request, exc: Exception) -> JSONResponse:
        log.warning("database unavailable: %s", type(exc).__name__)
        return _unavailable("database_unavailable", "the database is unreachable; retry later")

    async def queue_down(_: Request, exc: Exception) -> JSONResponse:
        log.warning("job queue unavailable: %s", type(exc).__name__)
        return _unavailable("queue_unavailable", "the job queue is unreachable; retry later")

    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error", exc_info=exc)
        return JSONResponse(
            ServiceError(500, "internal_error", "internal error; it has been logged").body(),
            status_code=500,
        )

    for db_exc in DATABASE_DOWN:
        app.add_exception_handler(db_exc, database_down)
    for queue_exc in QUEUE_DOWN:
        app.add_exception_handler(queue_exc, queue_down)
    app.add_exception_handler(Exception, unexpected)
