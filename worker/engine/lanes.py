"""Threads around the model: how many lanes, their torch threads, and the lock that keeps
whisper's own ``transcribe()`` (which hooks the model's modules) apart from batched windows."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch


def default_lanes(device: torch.device) -> int:
    """Lanes (engine threads, each with its own windows) when not configured. On a CPU two:
    one lane's decoder steps are hundreds of small, memory-bound ops while the other's
    encoder is compute-bound, so two lanes on half the cores each keep every core on the
    model (bench/RESULTS.md). On CUDA one: the GPU runs one stream of kernels anyway."""
    if device.type != "cpu":
        return 1
    return 2 if torch.get_num_threads() >= 2 else 1


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op threads set to n for the block (this thread runs all of the engine's
    model work, so nothing else sees the change)."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class ModelLock:
    """Shared for batched windows, exclusive for whisper's own transcribe() (it installs
    hooks on the model's modules), writers first so an exact job is not starved."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()
