"""The null engine (``WHISPERQ_ENGINE=null``): the engine's seam without a model.

It answers every job at once with an empty transcript, no model time and no tokens, so a
worker running it exercises everything around the engine (messages, claims, audio loading,
the guarded finish, metering rows, webhooks) at the rate the control plane alone allows. It
is a capacity test of the control plane, never a way to serve real traffic: every job
"succeeds" with nothing in it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from concurrent.futures import Future

from worker.engine import EngineJob, EngineResult

# As many jobs in flight as a batched engine on a GPU holds (its rows plus as many ready), so
# the worker's pool and claims have the shape a real GPU worker has; the control plane is
# what runs out.
DEFAULT_MAX_IN_FLIGHT = 1024


class NullEngine:
    """Same interface as :class:`worker.engine.Engine` as the worker uses it."""

    lanes = 0
    lane_threads = 0
    projection = "none"

    def __init__(self, *, max_in_flight: int = DEFAULT_MAX_IN_FLIGHT) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be >= 1")
        self.max_in_flight = max_in_flight
        self.max_batch_rows = max_in_flight
        self.announced = 0  # nothing ever waits for an announced job here

    def submit(self, job: EngineJob) -> Future[EngineResult]:
        fut: Future[EngineResult] = Future()
        fut.set_result(
            EngineResult(
                text="",
                segments=(),
                # No audio is looked at, so nothing is detected: the language asked for, else
                # the one an English-only Whisper answers with.
                language=job.options.language or "en",
                runtime_ms=0,
                tokens_generated=0,
                tokens_input=0,
            )
        )
        return fut

    def announce(self) -> None:
        pass

    def withdraw(self) -> None:
        pass

    @contextlib.contextmanager
    def announcing(self) -> Iterator[None]:
        yield

    def close(self, timeout: float | None = None) -> None:
        pass
