"""The Celery app as the API sees it: a producer of job ids. Only ids travel, never audio,
secrets or transcripts. The worker adds its tasks to this same app (worker/celery_app.py)."""

from __future__ import annotations

from functools import lru_cache

from celery import Celery
from kombu import Queue  # type: ignore[attr-defined]

from app.settings import Settings, get_settings

RUN_JOB = "whisperq.run_job"
DELIVER_WEBHOOK = "whisperq.deliver_webhook"


def build_celery(settings: Settings) -> Celery:
    celery = Celery("whisperq", broker=settings.redis_url)
    celery.conf.update(
        task_queues=[
            Queue(name)  # type: ignore[no-untyped-call]
            for name in (settings.queue_interactive, settings.queue_bulk, settings.queue_webhooks)
        ],
        task_default_queue=settings.queue_interactive,
        task_routes={DELIVER_WEBHOOK: {"queue": settings.queue_webhooks}},
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        # A task is acked only when it finished; a worker that dies mid-job gives it back.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,
        # A worker's heartbeat keeps the messages it holds fresh; one that died has its
        # messages put back after the visibility timeout, checked this often by every worker.
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_s,
            "unacked_restore_interval": settings.unacked_restore_interval_s,
            "unacked_restore_throttle": 1,
        },
        worker_hijack_root_logger=False,
        worker_send_task_events=True,  # Flower
        task_send_sent_event=True,
    )
    return celery


@lru_cache
def get_celery() -> Celery:
    return build_celery(get_settings())


def send_job(job_id: str, *, queue: str) -> None:
    # The message's id is its job's, so Flower's task list reads in job ids (a message may
    # still run another job: the worker claims by policy; its log line names the job run).
    get_celery().send_task(RUN_JOB, args=[job_id], queue=queue, task_id=job_id or None)


# Messages a bulk enqueue pipelines into one Redis round trip (kombu's publish batches).
SEND_CHUNK = 500


class SendError(Exception):
    """The broker failed partway: the first ``sent`` messages are in Redis, the rest may not
    be."""

    def __init__(self, sent: int, cause: Exception) -> None:
        super().__init__(f"{sent} messages sent, then: {cause}")
        self.sent, self.cause = sent, cause


def send_jobs(job_ids: list[str], *, queue: str) -> None:
    """One message per job, as :func:`send_job` sends them, over one connection and in
    pipelined chunks: a 1,000-input batch costs a few round trips, not 1,000 (and kombu does
    not build a Redis client per message). Raises :class:`SendError`."""
    celery = get_celery()
    sent = 0
    try:
        with celery.producer_or_acquire() as producer:
            for start in range(0, len(job_ids), SEND_CHUNK):
                chunk = job_ids[start : start + SEND_CHUNK]
                with producer.batch(max_size=2 * len(chunk) + 1):
                    for job_id in chunk:
                        celery.send_task(
                            RUN_JOB, args=[job_id], queue=queue, task_id=job_id, producer=producer
                        )
                sent += len(chunk)
    except Exception as exc:
        raise SendError(sent, exc) from exc


def send_delivery(delivery_id: str, *, countdown: float = 0.0) -> None:
    get_celery().send_task(
        DELIVER_WEBHOOK,
        args=[delivery_id],
        countdown=countdown or None,
        queue=get_settings().queue_webhooks,
    )
