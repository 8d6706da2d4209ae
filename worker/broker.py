"""Kombu's Redis transport as whisperq reads it: the one module that knows the names of its
private structures (tests/test_imports.py holds that no other module spells them).

kombu 5.x lays a queue out as one Redis list plus one list per priority step, and a message a
worker took but has not acked sits in the ``unacked`` hash (tag → message) with its delivery
time in the ``unacked_index`` sorted set. The transport puts a held message back in its queue
once its time there is older than the visibility timeout, so a worker refreshes the times of
the messages it holds (its heartbeat) and a dead worker's messages return on their own.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

PRIORITY_SEP = "\x06\x16"
PRIORITY_STEPS = (3, 6, 9)
UNACKED = "unacked"
UNACKED_INDEX = "unacked_index"


@dataclass(frozen=True)
class BrokerCounts:
    waiting: dict[str, int]  # messages in each job queue
    held: int  # job messages taken by workers and not yet acked


def broker_counts(client: Any, queues: Sequence[str]) -> BrokerCounts:
    """One atomic read (MULTI) of the job queues' lengths and the held messages."""
    pipe = client.pipeline(transaction=True)
    for queue in queues:
        pipe.llen(queue)
        for step in PRIORITY_STEPS:
            pipe.llen(f"{queue}{PRIORITY_SEP}{step}")
    pipe.hvals(UNACKED)
    replies = pipe.execute()
    per_queue = 1 + len(PRIORITY_STEPS)
    waiting = {
        queue: sum(replies[i * per_queue : (i + 1) * per_queue]) for i, queue in enumerate(queues)
    }
    held = 0
    for raw in replies[-1]:
        try:
            _payload, _exchange, routing_key = json.loads(raw)
        except (ValueError, TypeError):
            continue
        held += routing_key in queues
    return BrokerCounts(waiting=waiting, held=held)


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

    for _ in range(5):
        try:  # the worker's sets change under us; a retry is cheaper than a lock
            requests = [
                *state.reserved_requests,
                *state.active_requests,
                *state.scheduled_requests,
            ]
            break
        except RuntimeError:
            continue
    else:
        return []
    tags = (getattr(getattr(r, "message", None), "delivery_tag", None) for r in requests)
    return [str(t) for t in tags if t]
