"""The engine's cumulative counters: where the lanes' time went. Read by benchmarks, logged
every :data:`STATS_LOG_INTERVAL_S` and when a burst of work ends."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

log = logging.getLogger("worker.engine")

# How often the lanes log their cumulative counters.
STATS_LOG_INTERVAL_S = 60.0


@dataclass
class EngineStats:
    """Cumulative counters of all lanes; every update takes the lock (lanes run side by side).

    Fields are read as attributes; ``stats["name"]`` and iteration over the names still work
    for the benchmarks that read them as a dict."""

    windows: float = 0.0  # job-windows decoded (a job's window counts once, whatever fallbacks)
    log_mel_s: float = 0.0  # on the submitting threads
    encoder_calls: float = 0.0
    encoder_s: float = 0.0
    decode_passes: float = 0.0
    decode_rows: float = 0.0  # decoder rows over all passes (a beam job counts its beams)
    decode_steps: float = 0.0  # steps of the longest row of each pass
    decode_row_steps: float = 0.0  # steps each row was live, summed
    decode_row_slots: float = 0.0  # steps x rows of each pass: row_steps / row_slots is live
    decode_s: float = 0.0
    beam_passes: float = 0.0
    beam_jobs: float = 0.0
    beam_s: float = 0.0
    word_windows: float = 0.0  # job-windows aligned for word timestamps
    word_s: float = 0.0
    exact_jobs: float = 0.0  # jobs run by whisper's own transcribe()
    exact_s: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    _logged: float = field(default_factory=time.monotonic, repr=False, compare=False)
    _windows_logged: float = field(default=0.0, repr=False, compare=False)

    # ------------------------------------------------------------------ counting

    def add_log_mel(self, seconds: float) -> None:
        with self._lock:
            self.log_mel_s += seconds

    def add_encoder(self, seconds: float) -> None:
        with self._lock:
            self.encoder_calls += 1
            self.encoder_s += seconds

    def add_windows(self, n: int) -> None:
        with self._lock:
            self.windows += n

    def add_pass(
        self, *, rows: int, seconds: float, steps: int, row_steps: int, beam_jobs: int | None
    ) -> None:
        """One decode pass of `rows` decoder rows; beam_jobs: the jobs of a beam pass."""
        with self._lock:
            self.decode_passes += 1
            self.decode_rows += rows
            self.decode_s += seconds
            self.decode_steps += steps
            self.decode_row_steps += row_steps
            self.decode_row_slots += steps * rows
            if beam_jobs is not None:
                self.beam_passes += 1
                self.beam_jobs += beam_jobs
                self.beam_s += seconds

    def add_words(self, windows: int, seconds: float) -> None:
        with self._lock:
            self.word_windows += windows
            self.word_s += seconds

    def add_exact(self, seconds: float) -> None:
        with self._lock:
            self.exact_jobs += 1
            self.exact_s += seconds

    # ------------------------------------------------------------------ reading

    def names(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if not f.name.startswith("_")]

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return {name: getattr(self, name) for name in self.names()}

    def reset(self) -> None:
        with self._lock:
            for name in self.names():
                setattr(self, name, 0.0)

    def keys(self) -> list[str]:
        return self.names()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __getitem__(self, name: str) -> float:
        if name not in self.names():
            raise KeyError(name)
        value: float = getattr(self, name)
        return value

    def __setitem__(self, name: str, value: float) -> None:
        if name not in self.names():
            raise KeyError(name)
        with self._lock:
            setattr(self, name, value)

    # ------------------------------------------------------------------ logging

    def log(self, force: bool = False) -> None:
        """Log the counters: when forced, else at most every STATS_LOG_INTERVAL_S."""
        now = time.monotonic()
        if not force and now - self._logged < STATS_LOG_INTERVAL_S:
            return
        self._logged = now
        st = self.snapshot()
        self._windows_logged = st["windows"]
        log.info(
            "engine: %d windows, log-mel %.1f s, encoder %d calls %.1f s, decode %d passes "
            "(%.1f rows each, %d steps, %.0f%% of row-steps live) %.1f s, of which beam search "
            "%d job-windows in %d passes %.1f s, word alignment %d job-windows %.1f s, "
            "exact %d jobs %.1f s",
            st["windows"],
            st["log_mel_s"],
            st["encoder_calls"],
            st["encoder_s"],
            st["decode_passes"],
            st["decode_rows"] / max(1, st["decode_passes"]),
            st["decode_steps"],
            100 * st["decode_row_steps"] / max(1.0, st["decode_row_slots"]),
            st["decode_s"],
            st["beam_jobs"],
            st["beam_passes"],
            st["beam_s"],
            st["word_windows"],
            st["word_s"],
            st["exact_jobs"],
            st["exact_s"],
        )

    def log_if_new_windows(self) -> None:
        """Log if windows were decoded since the last log (a burst of work just ended)."""
        self.log(force=self._windows_logged != self.windows)
