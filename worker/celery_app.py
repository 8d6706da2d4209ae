"""The worker's Celery app: the API's producer app plus the tasks and worker-side settings.

Run it with ``whisperq worker`` (threads pool: several jobs in flight feed one engine)."""

from __future__ import annotations

import threading
from typing import Any

from celery.signals import worker_ready, worker_shutdown

from app.queue import get_celery
from app.settings import get_settings, settings_or_exit
from worker.observability import install as install_observability

settings_or_exit()  # `celery -A worker.celery_app` too refuses weak secrets at start
celery = get_celery()
celery.conf.update(include=["worker.tasks"])
install_observability(celery)  # metrics, /readyz, request-id logs, audio cleanup (issue 16)

_stop_reaper = threading.Event()


@worker_ready.connect  # type: ignore[untyped-decorator]
def _start_reaper(**_: Any) -> None:
    from worker.reaper import start_reaper

    start_reaper(get_settings(), _stop_reaper)


@worker_shutdown.connect  # type: ignore[untyped-decorator]
def _stop(**_: Any) -> None:
    _stop_reaper.set()
