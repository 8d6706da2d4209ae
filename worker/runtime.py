"""The one engine of this worker process, created on first use (after any fork)."""

from __future__ import annotations

import logging
import threading

from app.settings import get_settings
from worker.engine import Engine
from worker.model_loading import load_model_or_fallback, pick_device

log = logging.getLogger(__name__)
_lock = threading.Lock()
_engine: Engine | None = None


def get_engine() -> Engine:
    global _engine
    with _lock:
        if _engine is None:
            settings = get_settings()
            device = pick_device(settings.device)
            model, _served = load_model_or_fallback(
                settings.model, device=device, download_root=settings.model_download_root
            )
            _engine = Engine(
                model,
                max_batch_rows=settings.engine_max_batch_rows,
                max_wait_ms=settings.engine_max_wait_ms,
            )
        return _engine
