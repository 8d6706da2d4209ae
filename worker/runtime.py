"""Per worker process: the one engine, the room for claims (:class:`Capacity`), the jobs in
flight and their heartbeat, and the shutdown flag.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from app.infra.logging import Event
from app.infra.queue import WAKE_UNITS, queue_of
from app.jobs import claims
from app.settings import Settings, get_settings
from worker import broker
from worker.engine import Engine
from worker.model_loading import load_model_or_fallback, pick_device
from worker.null_engine import NullEngine

log = logging.getLogger(__name__)
_lock = threading.Lock()
_engine: Engine | NullEngine | None = None
_capacity: Capacity | None = None
_runners: ThreadPoolExecutor | None = None

# Set by SIGTERM (Celery's warm shutdown): tasks waiting for a slot give their message back,
# running ones finish within the grace period or hand their job back.
stopping = threading.Event()

STOP_CANCELED = "canceled"
STOP_TIME_LIMIT = "time_limit_exceeded"
STOP_SHUTDOWN = "shutdown"
STOP_LEASE_LOST = "lease_lost"
# With an engine that stops between windows, how long a stopped job lets it reach the next one.
ENGINE_STOP_WAIT_S = 60.0

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
                step_mode=settings.engine_step_mode,
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


class Capacity:
    """The jobs this worker holds (claimed and not yet ended) against what the engine runs at
    once. A task claims only once it has taken room for its claims: a job is never claimed to
    wait far behind others, so a worker that dies strands little it had not started (the
    messages it merely held go back to Redis). Interactive jobs have room of their own: bulk
    work never keeps one waiting (the engine puts its rows first), and they are bounded among
    themselves, so a worker does not hoard them while another is idle."""

    def __init__(self, limit: int, on_bulk_room: Callable[[bool], None] | None = None) -> None:
        """``on_bulk_room`` is told, from the thread that changed it, whether this worker
        should take more bulk messages (flow control: worker/broker.consume)."""
        self.limit = limit
        self.used = 0
        self.urgent_used = 0
        self.bulk_waiting = 0  # claims of bulk messages waiting for room
        self._waiting: list[tuple[int, bool]] = []  # (claims, urgent) of each waiting take
        self._cond = threading.Condition()
        self._on_bulk_room = on_bulk_room
        self._bulk_room = True

    def take(self, n: int, timeout: float, *, urgent: bool = False) -> Taken | None:
        """Room for ``n`` claims, once there is room for ``min(n, limit)`` (a units message
        may ask for more jobs than a small engine runs at once: those wait in its queue);
        ``urgent`` (an interactive job) once fewer than ``limit`` urgent jobs are held."""
        need = (min(n, self.limit), urgent)
        with self._cond:
            if not self._fits(need):
                self._waiting.append(need)
                try:
                    if not self._cond.wait_for(lambda: self._fits(need), timeout):
                        return None
                finally:
                    self._waiting.remove(need)
            self.used += n
            self.urgent_used += n if urgent else 0
        return Taken(self, n, urgent=urgent)

    def _fits(self, need: tuple[int, bool]) -> bool:
        n, urgent = need
        return (self.urgent_used if urgent else self.used) + n <= self.limit

    def give(self, n: int, *, urgent: bool = False) -> None:
        with self._cond:
            self.used -= n
            self.urgent_used -= n if urgent else 0
            # Only when a waiter's claims now fit (or the last job ended, for shutdown):
            # waking every waiting message for each job that ends (a thousand a second, a
            # dozen waiters) cost the worker more than the jobs did.
            if self.used <= 0 or any(self._fits(need) for need in self._waiting):
                self._cond.notify_all()

    @contextlib.contextmanager
    def bulk_wait(self, n: int) -> Iterator[bool]:
        """A bulk message (``n`` claims) waiting for room: yields False when an engine's
        worth of bulk claims already wait (the message goes back at once, and the worker
        stops taking bulk messages until they get room). That many wait so room that frees
        up is taken at once (the consumer's loop takes up to a second to start consuming
        again); more would keep the Celery threads an interactive job needs, and work that
        another worker could run, waiting here."""
        with self._cond:
            if self.bulk_waiting >= self.limit:
                yield False
                return
            self.bulk_waiting += n
            self._bulk_room_is(self.bulk_waiting < self.limit)
        try:
            yield True
        finally:
            with self._cond:
                self.bulk_waiting -= n
                self._bulk_room_is(self.bulk_waiting < self.limit)

    def _bulk_room_is(self, room: bool) -> None:
        # Under the lock: the flips reach the consumer in the order they happened.
        if room != self._bulk_room:
            self._bulk_room = room
            if self._on_bulk_room is not None:
                self._on_bulk_room(room)

    def wait_empty(self, timeout: float) -> bool:
        """Until every job this worker holds has ended (shutdown)."""
        with self._cond:
            return self._cond.wait_for(lambda: self.used <= 0, timeout)


class Taken:
    """Room one task took: given back as its jobs end (from the threads that run them) and
    the rest when the task is done."""

    def __init__(self, capacity: Capacity, n: int, *, urgent: bool = False) -> None:
        self._capacity = capacity
        self.left = n
        self.urgent = urgent
        self._lock = threading.Lock()

    def split(self, n: int) -> Taken:
        """``n`` of this room, handed to a job that runs on another thread."""
        with self._lock:
            n = min(n, self.left)
            self.left -= n
        return Taken(self._capacity, n, urgent=self.urgent)

    def give(self, n: int) -> None:
        with self._lock:
            n = min(n, self.left)
            self.left -= n
        if n:
            self._capacity.give(n, urgent=self.urgent)

    def give_all(self) -> None:
        self.give(self.left)


def capacity() -> Capacity:
    global _capacity
    engine = get_engine()
    with _lock:
        if _capacity is None:
            _capacity = Capacity(engine_slots(engine), on_bulk_room=_consume_bulk)
        return _capacity


def _consume_bulk(on: bool) -> None:
    """Take bulk messages only while few wait for room here (the rest stay in Redis for
    other workers); interactive ones always."""
    settings = get_settings()
    jobs = {settings.queue_interactive, settings.queue_bulk}
    bulk = [
        q for q in _consumed or [] if queue_of(q)[0] in jobs and q != settings.queue_interactive
    ]
    broker.consume(bulk, on)


def wait_for_jobs(timeout: float) -> bool:
    """Until every job this worker holds has ended (shutdown); True if none was made."""
    with _lock:
        made = _capacity
    return made is None or made.wait_empty(timeout)


def runners() -> ThreadPoolExecutor:
    """Threads that run the jobs of units messages: as many as the worker may hold at once
    (the engine's slots, overdrawn by one message at most, and urgent jobs)."""
    global _runners
    engine = get_engine()
    with _lock:
        if _runners is None:
            _runners = ThreadPoolExecutor(
                max_workers=2 * engine_slots(engine) + WAKE_UNITS, thread_name_prefix="whisperq-job"
            )
        return _runners


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
    before bulk work whichever queue its message came from (consuming a queue's units twin
    is serving that queue)."""
    order = [settings.queue_interactive, settings.queue_bulk]
    if _consumed is None:
        return order
    served = {queue_of(name)[0] for name in _consumed}
    return [q for q in order if q in served]
