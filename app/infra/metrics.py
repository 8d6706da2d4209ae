"""Prometheus metrics: what the API reports (jobs by state and queue from Postgres, queue
depth from Redis, read at scrape time so they always equal the database) and what each
worker counts as it finishes jobs and webhook attempts.

Each process has its own registry (the worker serves it on WHISPERQ_WORKER_METRICS_PORT);
nothing is written to the global default registry, so tests can build several apps.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from app.infra.models import Job
from app.settings import Settings

log = logging.getLogger(__name__)

# Seconds: from a cut of a second up to the longest jobs (hours).
TIME_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600, 14400)
RTF_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class DatabaseCollector(Collector):
    """Jobs by state and queue, and broker queue depth, read when Prometheus scrapes."""

    def __init__(self, settings: Settings, queue_depth: Callable[[str], int | None]) -> None:
        self.settings = settings
        self.queue_depth = queue_depth

    def collect(self) -> Iterable[GaugeMetricFamily]:
        from app.infra.db import get_sessionmaker

        jobs = GaugeMetricFamily(
            "whisperq_jobs", "Jobs in the database by state and queue", labels=["state", "queue"]
        )
        with get_sessionmaker()() as session:
            rows = session.execute(
                select(Job.status, Job.queue, func.count()).group_by(Job.status, Job.queue)
            ).all()
        for status, queue, count in rows:
            jobs.add_metric([str(status), str(queue)], float(count))
        yield jobs
        depth = GaugeMetricFamily(
            "whisperq_queue_depth", "Messages waiting in the broker queue", labels=["queue"]
        )
        s = self.settings
        for queue in (s.queue_interactive, s.queue_bulk, s.queue_webhooks):
            n = self.queue_depth(queue)
            if n is not None:
                depth.add_metric([queue], float(n))
        yield depth


def redis_queue_depth(redis_url: str) -> Callable[[str], int | None]:
    import redis

    client = redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)

    def depth(queue: str) -> int | None:
        try:
            return int(client.llen(queue))
        except redis.RedisError:
            log.warning("metrics: Redis unreachable for queue depth")
            return None

    return depth


def api_registry(settings: Settings) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DatabaseCollector(settings, redis_queue_depth(settings.redis_url)))
    return registry


@dataclass(frozen=True)
class WorkerMetrics:
    registry: CollectorRegistry
    jobs: Counter
    queue_wait: Histogram
    model_time: Histogram
    audio_seconds: Counter
    real_time_factor: Histogram
    batch_size: Histogram
    webhook_attempts: Counter
    model_loaded: Gauge


def worker_metrics() -> WorkerMetrics:
    r = CollectorRegistry()
    return WorkerMetrics(
        registry=r,
        jobs=Counter(
            "whisperq_worker_jobs",
            "Jobs this worker finished, by outcome and queue",
            ["status", "queue"],
            registry=r,
        ),
        queue_wait=Histogram(
            "whisperq_queue_wait_seconds",
            "From enqueue to a worker starting the job",
            ["queue"],
            buckets=TIME_BUCKETS,
            registry=r,
        ),
        model_time=Histogram(
            "whisperq_model_seconds",
            "Model time per job (what is billed)",
            ["queue"],
            buckets=TIME_BUCKETS,
            registry=r,
        ),
        audio_seconds=Counter(
            "whisperq_audio_seconds_processed",
            "Seconds of audio in succeeded jobs",
            ["queue"],
            registry=r,
        ),
        real_time_factor=Histogram(
            "whisperq_real_time_factor",
            "Model seconds per audio second (lower is faster)",
            buckets=RTF_BUCKETS,
            registry=r,
        ),
        batch_size=Histogram(
            "whisperq_engine_batch_size",
            "Rows per engine decode step",
            buckets=BATCH_BUCKETS,
            registry=r,
        ),
        webhook_attempts=Counter(
            "whisperq_webhook_attempts",
            "Webhook delivery attempts by outcome",
            ["outcome"],
            registry=r,
        ),
        model_loaded=Gauge(
            "whisperq_worker_model_loaded", "1 once the model is loaded", registry=r
        ),
    )
