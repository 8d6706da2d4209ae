"""Many threads' database calls as one: the worker's claims and finishes.

A worker runs one Celery task thread per job in flight. Each used to claim its job in a
transaction of its own and store its outcome in another, so Postgres saw two commits per job
whatever the load. A :class:`Coalescer` hands the requests that arrive while its previous
call runs to one call of ``run_batch``: alone a request goes at once (no added wait, an
interactive job starts as before); under load the calls grow to ``max_batch`` requests and
the commits per job shrink with them.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

Request = TypeVar("Request")
Response = TypeVar("Response")


class Coalescer(Generic[Request, Response]):
    def __init__(
        self,
        name: str,
        run_batch: Callable[[Sequence[Request]], Sequence[Response | Exception]],
        *,
        max_batch: Callable[[], int],
    ) -> None:
        """``run_batch`` answers each request of its list, in order (an exception as the
        answer fails that request alone), or raises for all of them; ``max_batch`` is read
        before each call (the engine's slots may change)."""
        self.name = name
        self._run_batch = run_batch
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[tuple[Request, Future[Response]]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start = threading.Lock()

    def submit(self, request: Request) -> Response:
        """The response to this request (blocks); raises what ``run_batch`` raised."""
        future: Future[Response] = Future()
        self._queue.put((request, future))
        self._ensure_thread()
        return future.result()

    def _ensure_thread(self) -> None:
        if self._thread is None:
            with self._start:
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._loop, name=f"coalesce-{self.name}", daemon=True
                    )
                    self._thread.start()

    def _loop(self) -> None:
        while True:
            batch = [self._queue.get()]
            limit = max(1, self._max_batch())
            while len(batch) < limit:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            self._run(batch)

    def _run(self, batch: list[tuple[Request, Future[Response]]]) -> None:
        try:
            responses = self._run_batch([request for request, _ in batch])
            if len(responses) != len(batch):
                raise RuntimeError(f"{self.name}: {len(responses)} answers to {len(batch)}")
        except Exception as exc:  # every caller handles it as its own call's failure
            for _, future in batch:
                future.set_exception(exc)
            return
        for (_, future), response in zip(batch, responses, strict=True):
            if isinstance(response, Exception):
                future.set_exception(response)
            else:
                future.set_result(response)
