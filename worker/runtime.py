"""Per worker process: the one engine, the claim slots, the jobs in flight and their
heartbeat, and the shutdown flag.

A task claims a job only once it holds a slot, and there are as many slots as the engine runs
jobs at once: a job is never claimed to wait behind others, so a worker that dies strands
nothing it had not started (the messages it merely held go back to Redis, see below).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from app.infra.logging import Event
from app.jobs import claims
from app.settings import Settings, get_settings
from worker import broker
from worker.engine import Engine
from worker.model_loading import load_model_or_fallback, pick_device
from worker.null_engine import NullEngine

log = logging.getLogger(__name__)
_lock = threading.Lock()
_engine: Engine | NullEngine | None = None
_slots: threading.BoundedSemaphore | None = None

# Set by SIGTERM (Celery's warm shutdown): tasks waiting for a slot give their message back,
# running ones finish within the grace period or hand their job back.
stopping = threading.Event()

STOP_CANCELED = "canceled"
STOP_TIME_LIMIT = "time_limit_exceeded"
STOP_SHUTDOWN = "shutdown"
STOP_LEASE_LOST = "lease_lost"

# Observability reads this module (is the model loaded?), so it cannot be imported from here:
# the Celery app, which imports both, subscribes it to the engine's batches instead.
_batch_observer: Callable[[int], None] | None = None


def observe_batches(observer: Callable[[int], None]) -> None:
    """Have ``observer`` called with the rows of each step the engine decodes."""
    global _batch_observer
    _batch_observer = observer


def _on_batch(rows: int) -> None:
    # Looked up at each step, not when the engine is made: `whisperq worker` loads the model
    # before it imports the Celery app that subscribes.
    observer = _batch_observer
    if observer is not None:
        observer(rows)


def current_engine() -> Engine | NullEngine | None:
    """The engine if this process made one, without making it (None until the model loads):
    for health checks, which must not load a model to answer."""
    return _engine


def get_engine() -> Engine | NullEngine:
    global _engine
    with _lock:
        if _engine is None:
            settings = get_settings()
            if settings.engine == "null":
                # No model at all: the control plane is what a null worker measures.
                _engine = NullEngine()
                log.warning(
                    "engine: null engine (WHISPERQ_ENGINE=null): no model loaded, every job"
                    " succeeds at once with an empty transcript; a capacity test of the"
                    " control plane, never for real traffic (%d jobs in flight)",
                    _engine.max_in_flight,
                    extra={"event": Event.engine_ready, "engine": "null"},
                )
                return _engine
            device = pick_device(settings.device)
            model, _served = load_model_or_fallback(
                settings.model,
                device=device,
                download_root=settings.model_download_root,
                redis_url=settings.redis_url,  # the API refuses what this model cannot do
            )
            _engine = Engine(
                model,
                max_batch_rows=settings.engine_max_batch_rows,
                ready_rows=settings.engine_ready_rows,
                lanes=settings.engine_lanes,
                max_wait_ms=settings.engine_max_wait_ms,
                on_batch=_on_batch,
            )
            log.info(
                "engine: %d lane(s) x %d torch thread(s) on %s, up to %d rows per window,"
                " %d jobs in flight, vocabulary projection: %s",
                _engine.lanes,
                _engine.lane_threads,
                device,
                _engine.max_batch_rows,
                _engine.max_in_flight,
                _engine.projection,
                extra={"event": Event.engine_ready, "engine": "batched", "model": _served},
            )
        return _engine


def engine_slots(engine: object) -> int:
    return max(1, int(getattr(engine, "max_in_flight", 1)))


def claim_slots() -> threading.BoundedSemaphore:
    global _slots
    engine = get_engine()
    with _lock:
        if _slots is None:
            _slots = threading.BoundedSemaphore(engine_slots(engine))
        return _slots


@dataclass
class InFlight:
    """A claimed job as its task and the heartbeat share it."""

    claimed: claims.ClaimedJob
    # Why the run must stop (first reason wins); the engine polls it between windows.
    reason: str | None = None
    changed: threading.Event = field(default_factory=threading.Event)

    def stop(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
        self.changed.set()

    def stop_check(self) -> str | None:
        return self.reason


_in_flight: dict[str, InFlight] = {}
_in_flight_lock = threading.Lock()


def track(claimed: claims.ClaimedJob) -> InFlight:
    entry = InFlight(claimed)
    with _in_flight_lock:
        _in_flight[claimed.id] = entry
    if stopping.is_set():
        entry.stop(STOP_SHUTDOWN)
    return entry


def untrack(entry: InFlight) -> None:
    with _in_flight_lock:
        if _in_flight.get(entry.claimed.id) is entry:
            del _in_flight[entry.claimed.id]


def in_flight() -> list[InFlight]:
    with _in_flight_lock:
        return list(_in_flight.values())


def begin_shutdown() -> None:
    stopping.set()
    for entry in in_flight():
        entry.changed.set()  # wake the waiting tasks: they start their grace period now


def heartbeat_once(settings: Settings, held_tags: list[str], redis_client: Any) -> None:
    """Renew our leases (one statement) and mark the Redis messages we hold as alive."""
    entries = in_flight()
    if entries:
        try:
            beat = claims.renew_leases([e.claimed for e in entries], settings=settings)
        except Exception as exc:  # Postgres away: the lease outlives several missed beats
            log.warning("lease renewal failed (%s); retrying next beat", exc)
        else:
            for entry in entries:
                if entry.claimed.id in beat.cancel_requested:
                    entry.stop(STOP_CANCELED)
                elif entry.claimed.id not in beat.renewed:
                    entry.stop(STOP_LEASE_LOST)
    if held_tags:
        try:
            broker.refresh_held(redis_client, held_tags)
        except Exception as exc:
            log.warning("could not refresh held messages in Redis (%s)", exc)


def heartbeat_interval(settings: Settings) -> float:
    return min(settings.job_lease_s, settings.visibility_timeout_s) / 4


def start_heartbeat(settings: Settings, stop: threading.Event) -> threading.Thread:
    import redis

    client = redis.Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=5)

    def loop() -> None:
        while not stop.wait(heartbeat_interval(settings)):
            try:
                heartbeat_once(settings, broker.held_delivery_tags(), client)
            except Exception:  # never let the heartbeat die
                log.exception("heartbeat failed")

    thread = threading.Thread(target=loop, name="whisperq-heartbeat", daemon=True)
    thread.start()
    return thread


def stop_canceled(job_id: str) -> bool:
    """Ask the run of ``job_id`` to stop as canceled, if this worker holds it."""
    with _in_flight_lock:
        entry = _in_flight.get(job_id)
    if entry is None:
        return False
    entry.stop(STOP_CANCELED)
    return True


def start_cancel_listener(settings: Settings, stop: threading.Event) -> threading.Thread:
    """Stops a running job within a window of its cancel request instead of at the next
    heartbeat (a quarter lease later), by listening to the API's cancel signals. Pub/sub is
    at-most-once; the heartbeat still reads ``cancel_requested_at`` from the row."""
    import redis

    from app.infra.notify import CANCEL_CHANNEL

    def loop() -> None:
        while not stop.is_set():
            client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=5)
            pubsub = client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
            try:
                pubsub.subscribe(CANCEL_CHANNEL)
                while not stop.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    data = message.get("data") if message else None
                    if isinstance(data, bytes) and stop_canceled(data.decode(errors="replace")):
                        log.info("cancel requested for running job %s", data.decode())
            except Exception as exc:  # Redis away: the heartbeat still finds cancels
                log.warning("cancel listener lost Redis (%s); reconnecting", exc)
                stop.wait(1.0)
            finally:
                with contextlib.suppress(Exception):
                    pubsub.close()
                    client.close()

    thread = threading.Thread(target=loop, name="whisperq-cancels", daemon=True)
    thread.start()
    return thread


_consumed: list[str] | None = None


def set_consumed_queues(names: list[str]) -> None:
    global _consumed
    _consumed = list(names)


def job_queues(settings: Settings) -> list[str]:
    """The job queues this worker serves, interactive first: a claim takes interactive work
    before bulk work whichever queue its message came from."""
    order = [settings.queue_interactive, settings.queue_bulk]
    if _consumed is None:
        return order
    return [q for q in order if q in _consumed]
