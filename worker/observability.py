"""The worker's metrics, health endpoints, request-id logging and retention purge, hooked
in from outside the tasks so worker/tasks.py stays about jobs.

``install(celery)`` (called once from worker/celery_app.py) wraps the two functions every
job and webhook attempt pass through, ``claims.finish`` and ``deliveries.deliver_once``, and
connects Celery signals. A job counts once: only the run whose guarded finish stored it.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from celery import Celery
from celery.signals import task_postrun, task_prerun, worker_ready, worker_shutdown
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.infra.db import session_scope
from app.infra.logging import bind_request_id, configure_logging
from app.infra.metrics import WorkerMetrics, worker_metrics
from app.infra.models import Job, JobStatus, WebhookDelivery
from app.infra.queue import DELIVER_WEBHOOK, RUN_JOB
from app.settings import Settings, get_settings
from worker import runtime
from worker.gpu_metrics import GpuMemoryCollector

log = logging.getLogger("whisperq.worker")
METRICS = worker_metrics()
_server: ThreadingHTTPServer | None = None
_installed = False


METRICS.registry.register(GpuMemoryCollector())


def observe_batch(rows: int) -> None:
    """For the engine: rows decoded together in one step."""
    METRICS.batch_size.observe(rows)


def record_finished(job_id: str, *, attempt: int, status: JobStatus, m: WorkerMetrics) -> None:
    """Count a job this run stored (its audio is dropped by ``claims.finish`` itself)."""
    with session_scope() as session:
        job = session.get(Job, job_id)
        if job is None or job.status != status or job.attempts != attempt:
            return  # another run owns it, or it was canceled: not ours to count
        queue = job.queue
        m.jobs.labels(status=str(status), queue=queue).inc()
        if job.started_at is not None and job.enqueued_at is not None:
            wait = (job.started_at - job.enqueued_at).total_seconds()
            m.queue_wait.labels(queue=queue).observe(max(wait, 0.0))
        if status == JobStatus.succeeded:
            model_s = job.runtime_ms / 1000
            m.model_time.labels(queue=queue).observe(model_s)
            audio_s = (job.input_length_ms or 0) / 1000
            m.audio_seconds.labels(queue=queue).inc(audio_s)
            if audio_s > 0:
                m.real_time_factor.observe(model_s / audio_s)
    log.info(
        "job finished",
        extra={"event": "job_finished", "status": str(status), "queue": queue},
    )


def _wrap_finish(original: Callable[..., Any]) -> Callable[..., Any]:
    def finish(claimed: Any, *, status: JobStatus, **kwargs: Any) -> Any:
        out = original(claimed, status=status, **kwargs)
        try:
            record_finished(claimed.id, attempt=claimed.attempt, status=status, m=METRICS)
        except Exception:  # metrics must never fail a job that is already stored
            log.exception("recording a finished job failed")
        return out

    return finish


def _wrap_deliver(original: Callable[..., Any]) -> Callable[..., Any]:
    def deliver_once(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        METRICS.webhook_attempts.labels(outcome=str(result.outcome)).inc()
        log.info(
            "webhook attempt",
            extra={
                "event": "webhook_attempt",
                "outcome": str(result.outcome),
                "status_code": result.status_code,
                "latency_ms": result.latency_ms,
            },
        )
        return result

    return deliver_once


def _job_of_delivery(delivery_id: str) -> str | None:
    from sqlalchemy import select

    with session_scope() as session:
        return session.scalar(
            select(WebhookDelivery.job_id).where(WebhookDelivery.id == delivery_id)
        )


def _on_prerun(task: Any = None, args: Any = None, **_: Any) -> None:
    name = getattr(task, "name", "")
    first = args[0] if args else None
    if not isinstance(first, str):
        return
    if name == RUN_JOB:
        bind_request_id(first)
    elif name == DELIVER_WEBHOOK:
        bind_request_id(_job_of_delivery(first))


def _on_postrun(**_: Any) -> None:
    bind_request_id(None)


def _ready(settings: Settings) -> tuple[bool, dict[str, str]]:
    checks: dict[str, str] = {}
    checks["model"] = "ok" if runtime.current_engine() is not None else "not loaded"
    try:
        from sqlalchemy import text

        from app.infra.db import get_engine

        with get_engine().connect() as conn:
            conn.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = type(exc).__name__
    try:
        import redis

        client = redis.Redis.from_url(settings.redis_url, socket_timeout=2)
        client.ping()
        client.close()
        checks["redis"] = "ok"
    except Exception as exc:
        checks["redis"] = type(exc).__name__
    return all(v == "ok" for v in checks.values()), checks


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, CONTENT_TYPE_LATEST, generate_latest(METRICS.registry))
        elif path == "/healthz":
            self._send(200, "application/json", b'{"ok": true}')
        elif path == "/readyz":
            ok, checks = _ready(get_settings())
            body = json.dumps({"ok": ok, "checks": checks}).encode()
            self._send(200 if ok else 503, "application/json", body)
        else:
            self._send(404, "application/json", b'{"error": {"code": "not_found"}}')

    def _send(self, status: int, ctype: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: Any) -> None:
        pass


def start_http(settings: Settings) -> ThreadingHTTPServer | None:
    global _server
    if settings.worker_metrics_port <= 0 or _server is not None:
        return _server
    _server = ThreadingHTTPServer(
        (settings.worker_metrics_host, settings.worker_metrics_port), _Handler
    )
    _server.daemon_threads = True
    threading.Thread(target=_server.serve_forever, name="whisperq-metrics", daemon=True).start()
    log.info(
        "metrics on http://%s:%d/metrics",
        settings.worker_metrics_host,
        settings.worker_metrics_port,
    )
    return _server


_stop_purge = threading.Event()


def _purge_loop(settings: Settings) -> None:
    from app.infra.db import utcnow
    from app.jobs.retention import purge

    # A floor: the loop now always runs, and an interval of 0 would spin on the database.
    while not _stop_purge.wait(max(settings.purge_interval_s, 1.0)):
        try:
            purge(settings, now=utcnow())
        except Exception:  # the next round tries again
            log.exception("retention purge failed")


def _on_ready(**_: Any) -> None:
    METRICS.model_loaded.set(1)
    settings = get_settings()
    start_http(settings)
    # Always, even when nothing is kept: it also deletes audio a crash left behind (an
    # ended job's, or a blob no job names).
    threading.Thread(
        target=_purge_loop, args=(settings,), name="whisperq-purge", daemon=True
    ).start()


def _on_shutdown(**_: Any) -> None:
    _stop_purge.set()
    if _server is not None:
        _server.shutdown()


def install(celery: Celery) -> None:
    """Hook everything in, once per process (the worker imports celery_app once)."""
    global _installed
    if _installed:
        return
    _installed = True
    from app.jobs import claims
    from worker import deliveries

    configure_logging(get_settings())
    claims.finish = _wrap_finish(claims.finish)
    deliveries.deliver_once = _wrap_deliver(deliveries.deliver_once)  # type: ignore[attr-defined]
    task_prerun.connect(_on_prerun, weak=False)
    task_postrun.connect(_on_postrun, weak=False)
    worker_ready.connect(_on_ready, weak=False)
    worker_shutdown.connect(_on_shutdown, weak=False)
