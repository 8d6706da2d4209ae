"""The worker's Celery app: the API's producer app plus the tasks and worker-side settings.

Run it with ``whisperq worker`` (threads pool: several jobs in flight feed one engine)."""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery.signals import worker_ready, worker_shutdown, worker_shutting_down

from app.queue import get_celery
from app.settings import get_settings, settings_or_exit
from worker.observability import install as install_observability

settings_or_exit()  # `celery -A worker.celery_app` too refuses weak secrets at start

log = logging.getLogger(__name__)

celery = get_celery()
celery.conf.update(include=["worker.tasks"])
install_observability(celery)  # metrics, /readyz, request-id logs, audio cleanup (issue 16)

_stop_loops = threading.Event()


@worker_ready.connect  # type: ignore[untyped-decorator]
def _start_loops(sender: Any = None, **_: Any) -> None:
    from worker import runtime
    from worker.reaper import start_reaper

    settings = get_settings()
    consumer = getattr(sender, "app", None)
    if consumer is not None:
        runtime.set_consumed_queues(list(consumer.amqp.queues.consume_from or []))
    runtime.start_heartbeat(settings, _stop_loops)
    runtime.start_cancel_listener(settings, _stop_loops)
    start_reaper(settings, _stop_loops)


@worker_shutting_down.connect  # type: ignore[untyped-decorator]
def _shutting_down(**_: Any) -> None:
    from worker import runtime

    log.warning(
        "worker stopping: waiting tasks give their messages back, running jobs finish "
        "within %s s or are handed back",
        get_settings().worker_stop_grace_s,
    )
    runtime.begin_shutdown()


@worker_shutdown.connect  # type: ignore[untyped-decorator]
def _stop(**_: Any) -> None:
    _stop_loops.set()
