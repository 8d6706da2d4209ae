"""Kombu's Redis transport as whisperq reads it: the one module that knows the names of its
private structures (tests/test_imports.py holds that no other module spells them), and the
Celery consumer that repairs what its teardown breaks.

kombu 5.x lays a queue out as one Redis list plus one list per priority step, and a message a
worker took but has not acked sits in the ``unacked`` hash (tag → message) with its delivery
time in the ``unacked_index`` sorted set. The transport puts a held message back in its queue
once its time there is older than the visibility timeout, so a worker refreshes the times of
the messages it holds (its heartbeat) and a dead worker's messages return on their own.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from celery.worker.consumer import Consumer as CeleryConsumer

from app.infra.queue import WAKE_UNITS, queue_of, units_queue

log = logging.getLogger(__name__)

PRIORITY_SEP = "\x06\x16"
PRIORITY_STEPS = (3, 6, 9)
UNACKED = "unacked"
UNACKED_INDEX = "unacked_index"


@dataclass(frozen=True)
class BrokerCounts:
    """Wake-ups, in claims (a units message counts WAKE_UNITS, app/infra/queue.py)."""

    waiting: dict[str, int]  # in each job queue and its units twin, not yet delivered
    held: int  # delivered to a worker that has not claimed for them yet (the unacked hash)


def broker_counts(client: Any, queues: Sequence[str]) -> BrokerCounts:
    """One atomic read (MULTI) of the job queues' lengths and the held messages."""
    lists = [
        (q, name, units) for q in queues for name, units in ((q, 1), (units_queue(q), WAKE_UNITS))
    ]
    pipe = client.pipeline(transaction=True)
    for _queue, name, _units in lists:
        pipe.llen(name)
        for step in PRIORITY_STEPS:
            pipe.llen(f"{name}{PRIORITY_SEP}{step}")
    pipe.hvals(UNACKED)
    replies = pipe.execute()
    per_list = 1 + len(PRIORITY_STEPS)
    waiting = dict.fromkeys(queues, 0)
    for i, (queue, _name, units) in enumerate(lists):
        waiting[queue] += units * sum(replies[i * per_list : (i + 1) * per_list])
    held = 0
    for raw in replies[-1]:
        try:
            _payload, _exchange, routing_key = json.loads(raw)
        except (ValueError, TypeError):
            continue
        queue, units = queue_of(routing_key)
        held += units if queue in queues else 0
    return BrokerCounts(waiting=waiting, held=held)


def ack_running(task_id: str) -> bool:
    """Ack the message of this worker's running task ``task_id`` now, before the task ends
    (its claims committed: what the message asked for is done). Celery's own late ack at the
    end is then a no-op. False if the task is not running here."""
    from celery.worker import state

    for request in _requests(lambda: list(state.active_requests)):
        if request.id == task_id and not request.acknowledged:
            request.acknowledge()
            return True
    return False


def _requests(read: Any) -> list[Any]:
    for _ in range(5):
        try:  # the worker's sets change under us; a retry is cheaper than a lock
            return list(read())
        except RuntimeError:
            continue
    return []


def refresh_held(client: Any, tags: Sequence[str]) -> None:
    """Mark the messages this worker holds as delivered now, so the transport does not put
    them back while their jobs run. XX: only refresh; a message already acked or restored
    must not come back."""
    if tags:
        client.zadd(UNACKED_INDEX, dict.fromkeys(tags, time.time()), xx=True)


def held_delivery_tags() -> list[str]:
    """Delivery tags of the messages this worker holds: reserved, running, or waiting for
    their countdown (webhook retries)."""
    from celery.worker import state

    requests = _requests(
        lambda: [*state.reserved_requests, *state.active_requests, *state.scheduled_requests]
    )
    tags = (getattr(getattr(r, "message", None), "delivery_tag", None) for r in requests)
    return [str(t) for t in tags if t]


def consume(queues: Sequence[str], on: bool) -> bool:
    """Start or stop taking messages from these queues: flow control, so a worker with no
    room for a 64-job message leaves them in Redis for others (and keeps its Celery threads
    for single jobs). The change runs on the consumer's own loop; a message it had already
    popped from a stopped queue goes back (kombu). False if this process has no consumer.

    What is scheduled is "make it so", never the flip itself: kombu's hub keeps its ready
    callbacks in a set, so two flips scheduled before its loop turns may run in either
    order, and a stop run after the start that followed it left a worker with room that
    never took a bulk message again (a 20k backlog stalled with 38 messages waiting)."""
    consumer = _consumer
    if consumer is None:
        return False
    with _wanted_lock:
        _wanted.update(dict.fromkeys(queues, on))
    consumer.call_soon(apply_wanted, consumer)
    return True


def apply_wanted(consumer: Any) -> None:
    """Consume exactly the queues last asked for (on the consumer's loop; idempotent)."""
    tasks = getattr(consumer, "task_consumer", None)
    if tasks is None:  # not connected: flow control resumes with the next change
        return
    with _wanted_lock:
        wanted = dict(_wanted)
    for queue, on in wanted.items():
        if on and not tasks.consuming_from(queue):
            consumer.add_task_queue(queue)
        elif not on and tasks.consuming_from(queue):
            consumer.cancel_task_queue(queue)


_wanted: dict[str, bool] = {}
_wanted_lock = threading.Lock()

_consumer: Consumer | None = None


class Consumer(CeleryConsumer):  # type: ignore[misc]
    """Celery's consumer, surviving a broker that went away while jobs ran.

    On a lost connection Celery first ``collect()``s it, then ``close()``s it and ignores
    connection errors only. With kombu's Redis transport (5.7.0) ``collect()`` can leave the
    task channel open: draining its pending BRPOP fails, then closing another channel (an
    auto-delete broadcast queue) fails before the task channel's turn, and both failures are
    swallowed; yet ``collect()`` still detaches the transport from its connection
    (``transport.client = None``). ``close()`` then closes that channel for real: restoring
    its unacked messages (our running jobs) builds a Redis pool from ``transport.client``
    and raises ``AttributeError: 'NoneType' object has no attribute 'hostname'``. Celery
    calls that unrecoverable: the worker finished its jobs and exited, leaving the queue
    unserved until someone restarted it. Each later ack of those jobs' messages (acks late)
    goes through the same channel and fails the same way, in the event loop.

    So when the teardown of the discarded connection fails, the transport gets its
    connection back: the jobs still running ack their messages through it, as they do after
    a clean teardown. The messages that were not restored are not lost: they stay in Redis's
    unacked set for ``restore_visible`` (our heartbeat keeps them fresh while their jobs run),
    and if Redis lost them the reaper re-sends their jobs."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        global _consumer
        super().__init__(*args, **kwargs)
        _consumer = self

    def on_connection_error_after_connected(self, exc: Exception) -> None:
        lost = self.connection
        transport = getattr(lost, "transport", None)
        try:
            super().on_connection_error_after_connected(exc)
        except Exception as teardown:
            if lost is None or self.connection is not None:
                raise  # not the discarded connection's teardown: Celery's own handling
            if transport is not None and getattr(transport, "client", None) is None:
                transport.client = lost
            log.warning(
                "broker connection lost (%r); its teardown failed (%r), reconnecting anyway",
                exc,
                teardown,
            )
