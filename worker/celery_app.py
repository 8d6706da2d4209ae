"""The worker's Celery app: the API's producer app plus the tasks and worker-side settings,
and where the worker's parts are wired together (Celery signals, metrics).

Run it with ``whisperq worker`` (threads pool: several jobs in flight feed one engine).

Imports run one way: worker/tasks.py imports this module for the app its tasks register on,
and this module imports the runtime, the reaper and observability, none of which imports it
or the tasks back (tests/test_imports.py fails on a cycle)."""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery.signals import worker_ready, worker_shutdown, worker_shutting_down

from app.infra.queue import get_celery
from app.settings import get_settings, settings_or_exit
from worker import reaper, runtime
from worker.observability import install as install_observability
from worker.observability import observe_batch

settings_or_exit()  # `celery -A worker.celery_app` too refuses weak secrets at start

log = logging.getLogger(__name__)


celery = get_celery()
celery.conf.update(include=["worker.tasks"], worker_consumer="worker.broker:Consumer")
install_observability(celery)  # metrics, /readyz, request-id logs, the retention purge
# The engine's batch sizes on the worker's /metrics: runtime cannot import observability,
# which reads it.
runtime.observe_batches(observe_batch)

_stop_loops = threading.Event()


@worker_ready.connect  # type: ignore[untyped-decorator]
def _start_loops(sender: Any = None, **_: Any) -> None:
    settings = get_settings()
    consumer = getattr(sender, "app", None)
    if consumer is not None:
        runtime.set_consumed_queues(list(consumer.amqp.queues.consume_from or []))
    runtime.start_heartbeat(settings, _stop_loops)
    runtime.start_cancel_listener(settings, _stop_loops)
    reaper.start_reaper(settings, _stop_loops)


@worker_shutting_down.connect  # type: ignore[untyped-decorator]
def _shutting_down(**_: Any) -> None:
    log.warning(
        "worker stopping: waiting tasks give their messages back, running jobs finish "
        "within %s s or are handed back",
        get_settings().worker_stop_grace_s,
    )
    runtime.begin_shutdown()


@worker_shutdown.connect  # type: ignore[untyped-decorator]
def _stop(**_: Any) -> None:
    # Jobs of units messages run on job threads, not Celery's: they finish within the grace
    # or are handed back, with the heartbeat still renewing their leases meanwhile.
    settings = get_settings()
    runtime.wait_for_jobs(settings.worker_stop_grace_s + runtime.ENGINE_STOP_WAIT_S)
    _stop_loops.set()
