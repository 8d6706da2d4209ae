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
    send_jobs([job_id], queue=queue)


# Messages a bulk enqueue pipelines into one Redis round trip (kombu publish batches).
SEND_CHUNK = 500
# A bulk enqueue wakes workers for many jobs per message: a message in a job queue's units
# twin (``<queue>.x64``) stands for exactly WAKE_UNITS claims, so the reaper counts the
# wake-ups waiting in Redis from list lengths alone (worker/broker.py), and a backlog costs
# a Redis message, a task and an ack per 64 jobs instead of per job.
WAKE_UNITS = 64
UNITS_SUFFIX = f".x{WAKE_UNITS}"


def units_queue(queue: str) -> str:
    """The twin of a job queue whose messages each wake a worker for WAKE_UNITS jobs."""
    return f"{queue}{UNITS_SUFFIX}"


def queue_of(routing_key: str) -> tuple[str, int]:
    """The job queue a message's routing key belongs to, and the claims the message stands
    for."""
    if routing_key.endswith(UNITS_SUFFIX):
        return routing_key.removesuffix(UNITS_SUFFIX), WAKE_UNITS
    return routing_key, 1


class SendError(Exception):
    """The broker failed partway: the wake-ups for the first ``sent`` jobs are in Redis, the
    rest may not be."""

    def __init__(self, sent: int, cause: Exception) -> None:
        super().__init__(f"{sent} jobs' messages sent, then: {cause}")
        self.sent, self.cause = sent, cause


def send_jobs(job_ids: list[str], *, queue: str, celery: Celery | None = None) -> None:
    """Wake-ups for these committed jobs: one message per WAKE_UNITS of them in the queue's
    units twin, one per job for the rest (an interactive job, the end of a batch), over one
    connection and in pipelined chunks. The jobs are sent in order, so ``SendError.sent``
    counts a prefix of ``job_ids``. Raises :class:`SendError`."""
    celery = celery or get_celery()
    full = len(job_ids) - len(job_ids) % WAKE_UNITS
    # (first job, units, queue, task id): a units message's id is its first job's plus the
    # count, so Flower still names a job; a single job's message keeps its job's id.
    messages = [
        (job_ids[i], WAKE_UNITS, units_queue(queue), f"{job_ids[i]}+{WAKE_UNITS}")
        for i in range(0, full, WAKE_UNITS)
    ] + [(job_id, 1, queue, job_id) for job_id in job_ids[full:]]
    sent = 0
    try:
        with celery.producer_or_acquire() as producer:
            for start in range(0, len(messages), SEND_CHUNK):
                chunk = messages[start : start + SEND_CHUNK]
                with producer.batch(max_size=2 * len(chunk) + 1):
                    for first, units, to, task_id in chunk:
                        celery.send_task(
                            RUN_JOB,
                            args=[first] if units == 1 else [first, units],
                            queue=to,
                            task_id=task_id or None,
                            producer=producer,
                        )
                sent += sum(units for _, units, _, _ in chunk)
    except Exception as exc:
        raise SendError(sent, exc) from exc


def send_delivery(delivery_id: str, *, countdown: float = 0.0) -> None:
    get_celery().send_task(
        DELIVER_WEBHOOK,
        args=[delivery_id],
        countdown=countdown or None,
        queue=get_settings().queue_webhooks,
    )
