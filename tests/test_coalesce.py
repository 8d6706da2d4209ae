"""worker/coalesce.py: requests that arrive while a call runs go together into the next one,
each caller gets its own answer (or the call's error), and a lone request is not held."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import pytest

from worker.coalesce import Coalescer


def test_requests_waiting_during_a_call_share_the_next_one() -> None:
    calls: list[list[int]] = []
    first_running = threading.Event()
    release = threading.Event()

    def run(batch: Sequence[int]) -> list[int]:
        calls.append(list(batch))
        if len(calls) == 1:
            first_running.set()
            release.wait(10)
        return [n * 10 for n in batch]

    c: Coalescer[int, int] = Coalescer("test", run, max_batch=lambda: 4)
    answers: dict[int, int] = {}

    def ask(n: int) -> None:
        answers[n] = c.submit(n)

    threads = [threading.Thread(target=ask, args=(0,))]
    threads[0].start()
    assert first_running.wait(10)
    threads += [threading.Thread(target=ask, args=(n,)) for n in range(1, 7)]
    for t in threads[1:]:
        t.start()
    deadline = time.monotonic() + 10
    while c._queue.qsize() < 6:  # all six wait behind the first call
        assert time.monotonic() < deadline
        time.sleep(0.01)
    release.set()
    for t in threads:
        t.join(10)
    assert answers == {n: n * 10 for n in range(7)}
    # The first alone; the six waiting ones in calls of at most max_batch, in arrival order.
    assert calls[0] == [0]
    assert [len(c) for c in calls[1:]] == [4, 2]
    assert sorted(n for call in calls[1:] for n in call) == list(range(1, 7))


def test_a_failed_call_fails_each_of_its_callers_and_the_next_call_runs() -> None:
    failing = True

    def run(batch: Sequence[str]) -> list[str]:
        if failing:
            raise ConnectionError("database gone")
        return [s.upper() for s in batch]

    c: Coalescer[str, str] = Coalescer("test", run, max_batch=lambda: 8)
    with pytest.raises(ConnectionError):
        c.submit("a")
    failing = False
    assert c.submit("b") == "B"


def test_a_wrong_number_of_answers_is_an_error_not_a_mixup() -> None:
    c: Coalescer[int, int] = Coalescer("test", lambda batch: [1, 2], max_batch=lambda: 8)
    with pytest.raises(RuntimeError, match="2 answers to 1"):
        c.submit(5)


def test_an_exception_as_an_answer_fails_that_request_alone() -> None:
    def run(batch: Sequence[int]) -> list[int | Exception]:
        return [ValueError(f"bad {n}") if n < 0 else n for n in batch]

    c: Coalescer[int, int] = Coalescer("test", run, max_batch=lambda: 8)
    assert c.submit(3) == 3
    with pytest.raises(ValueError, match="bad -1"):
        c.submit(-1)
