"""The worker's metrics, health endpoints, request-id logging and retention purge, hooked
in from outside the tasks so worker/tasks.py stays about jobs.

``install(celery)`` (called once from worker/celery_app.py) registers the metrics hooks
with what every job end and webhook attempt pass through (``lifecycle.on_job_ended``,
``deliveries.on_attempt``) and connects Celery signals. A job counts once: it ends once.
Audio is not ours to delete: every end does that itself (app/jobs/lifecycle.py).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from celery import Celery
from celery.signals import task_postrun, task_prerun, worker_ready, worker_shutdown
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.infra.db import session_scope
from app.infra.logging import bind_request_id, configure_logging
from app.infra.metrics import WorkerMetrics, worker_metrics
from app.infra.models import JobStatus, WebhookDelivery
from app.infra.queue import DELIVER_WEBHOOK, RUN_JOB
from app.jobs.lifecycle import EndedJob, on_job_ended
from app.settings import Settings, get_settings
from worker import deliveries, runtime
from worker.gpu_metrics import GpuMemoryCollector
from worker.webhook_http import AttemptResult

log = logging.getLogger("whisperq.worker")
METRICS = worker_metrics()
_server: ThreadingHTTPServer | None = None
_installed = False


METRICS.registry.register(GpuMemoryCollector())


def observe_batch(rows: int) -> None:
    """For the engine: rows decoded together in one step."""
    METRICS.batch_size.observe(rows)


def record_ended(jobs: Sequence[EndedJob], m: WorkerMetrics = METRICS) -> None:
    """Count the jobs this process ended (a run's finish, or its reaper's lease expiry):
    each job ends once, in one process, so a job is counted once."""
    for job in jobs:
        queue = job.queue
        m.jobs.labels(status=str(job.status), queue=queue).inc()
        if job.started_at is not None and job.enqueued_at is not None:
            wait = (job.started_at - job.enqueued_at).total_seconds()
            m.queue_wait.labels(queue=queue).observe(max(wait, 0.0))
        if job.status == JobStatus.succeeded:
            model_s = job.runtime_ms / 1000
            m.model_time.labels(queue=queue).observe(model_s)
            audio_s = (job.input_length_ms or 0) / 1000
            m.audio_seconds.labels(queue=queue).inc(audio_s)
            if audio_s > 0:
                m.real_time_factor.observe(model_s / audio_s)
        log.info(
            "job finished",
            extra={
                "event": "job_finished",
                "status": str(job.status),
                "queue": queue,
                # Its own id, whatever task or sweep ended it.
                "request_id": job.id,
            },
        )


def record_attempt(delivery_id: str, result: AttemptResult, m: WorkerMetrics = METRICS) -> None:
    m.webhook_attempts.labels(outcome=str(result.outcome)).inc()
    log.info(
        "webhook attempt",
        extra={
            "event": "webhook_attempt",
            "outcome": str(result.outcome),
            "status_code": result.status_code,
            "latency_ms": result.latency_ms,
        },
    )


def register_hooks() -> None:
    """Metrics and logs for every job this process ends and every webhook attempt it makes:
    registered with the code that ends and attempts (never wrapped around it), so they run
    however that code is imported."""
    on_job_ended(record_ended)
    deliveries.on_attempt(record_attempt)


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
    configure_logging(get_settings())
    register_hooks()
    task_prerun.connect(_on_prerun, weak=False)
    task_postrun.connect(_on_postrun, weak=False)
    worker_ready.connect(_on_ready, weak=False)
    worker_shutdown.connect(_on_shutdown, weak=False)
