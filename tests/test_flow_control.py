"""Flow control (worker/broker.consume): a worker stops taking bulk messages while it has no
room and takes them again once it has, whatever order the consumer's loop runs the changes
in. kombu's hub keeps ready callbacks in a set; a 20k backlog once stalled for good when a
stop ran after the start that followed it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from worker import broker
from worker.runtime import Capacity


class _Tasks:
    def __init__(self, consumer: FakeConsumer) -> None:
        self._consumer = consumer

    def consuming_from(self, queue: str) -> bool:
        return queue in self._consumer.consuming


class FakeConsumer:
    """Celery's consumer as broker.consume uses it; callbacks run only when told, in an
    order the test picks (a set's order is any order)."""

    def __init__(self, queues: list[str]) -> None:
        self.consuming = set(queues)
        self.pending: list[Callable[[], None]] = []
        self.task_consumer: Any = _Tasks(self)

    def call_soon(self, fn: Callable[..., None], *args: Any) -> None:
        self.pending.append(lambda: fn(*args))

    def add_task_queue(self, queue: str) -> None:
        self.consuming.add(queue)

    def cancel_task_queue(self, queue: str) -> None:
        self.consuming.discard(queue)

    def run_pending(self, *, reverse: bool) -> None:
        todo, self.pending = self.pending, []
        for fn in reversed(todo) if reverse else todo:
            fn()


@pytest.fixture
def consumer(monkeypatch: pytest.MonkeyPatch) -> FakeConsumer:
    fake = FakeConsumer(["bulk", "bulk.x64", "interactive"])
    monkeypatch.setattr(broker, "_consumer", fake)
    monkeypatch.setattr(broker, "_wanted", {})
    return fake


@pytest.mark.parametrize("reverse", [False, True])
def test_the_last_change_wins_whatever_order_the_loop_runs_them(
    consumer: FakeConsumer, reverse: bool
) -> None:
    bulk = ["bulk", "bulk.x64"]
    broker.consume(bulk, False)
    broker.consume(bulk, True)  # room again before the loop turned
    consumer.run_pending(reverse=reverse)
    assert consumer.consuming == {"bulk", "bulk.x64", "interactive"}

    broker.consume(bulk, True)
    broker.consume(bulk, False)
    consumer.run_pending(reverse=reverse)
    assert consumer.consuming == {"interactive"}


def test_room_flips_through_capacity_end_with_the_worker_consuming(
    consumer: FakeConsumer,
) -> None:
    """Bulk messages waiting for room, the way run_job waits: once none waits, the worker
    takes bulk messages again, however the loop ordered the flips on the way."""
    room = Capacity(4, on_bulk_room=lambda on: broker.consume(["bulk", "bulk.x64"], on))
    with room.bulk_wait(4) as may_wait:  # an engine's worth waits: stop taking bulk
        assert may_wait
        with room.bulk_wait(1) as second:
            assert not second  # goes back at once
        assert consumer.pending
    consumer.run_pending(reverse=True)
    assert consumer.consuming == {"bulk", "bulk.x64", "interactive"}


def test_a_consumer_not_connected_takes_the_change_later(consumer: FakeConsumer) -> None:
    tasks, consumer.task_consumer = consumer.task_consumer, None
    broker.consume(["bulk"], False)
    consumer.run_pending(reverse=False)  # nothing to change yet
    consumer.task_consumer = tasks
    broker.consume(["bulk.x64"], False)
    consumer.run_pending(reverse=False)
    assert consumer.consuming == {"interactive"}
