"""The :class:`Engine`: one per worker process, the model and the lanes that batch jobs.

Tasks (several in flight per process) call :meth:`Engine.submit` and wait on the future. A
lane (a thread, on its share of torch's threads) takes up to ``max_batch_rows`` jobs from a
shared queue, highest priority and oldest first, decodes their current 30 s window as one
batch (:func:`worker.engine.windows.step_window`) and puts back the jobs with windows left:
jobs join and leave between windows, and any lane may run a job's next window. Jobs the
batched windows cannot reproduce exactly (best_of > 1 when sampling) run
whisper's own ``transcribe()`` beside the lanes, one at a time (:mod:`worker.engine.exact`).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import torch

from worker.engine import exact, windows
from worker.engine.decoding import BatchDecoder, suppress_list
from worker.engine.lanes import ModelLock, default_lanes, torch_threads
from worker.engine.longform import JobState, batched, check_options, log_mel
from worker.engine.sizing import bytes_per_row, default_batch_rows
from worker.engine.stats import EngineStats
from worker.engine.types import EngineJob, EngineResult, EngineStopped

if TYPE_CHECKING:
    from whisper.model import Whisper
    from whisper.tokenizer import Tokenizer

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH_ROWS = 16
DEFAULT_MAX_WAIT_MS = 10.0
# How long a window short of max_batch_rows waits for announced jobs (tasks waiting for a
# claim slot, claiming, or loading audio with ffprobe + ffmpeg). Bounded: a wait that finds
# nothing costs at most this per window.
DEFAULT_ANNOUNCE_WAIT_MS = 1000.0
ANNOUNCE_POLL_S = 0.02
# Torch threads of a decode pass on CPU; None: torch's count. A decoder step is hundreds of
# small ops. On the 2-core VM nearly quiet, torch's 2 threads made the whole service 1.5-1.6x
# sequential transcribe() against 1.0x with 1 thread; under heavy foreign load (run queue
# 8-16) 1 thread was far better (a 1-row step: 14 ms of CPU against 85-154 ms, each op
# waiting for a descheduled OpenMP thread). bench/RESULTS.md has both.
DEFAULT_CPU_DECODE_THREADS: int | None = None
# Windows per encoder call on a CPU (see Engine.encoder_chunk).
CPU_ENCODER_CHUNK = 1

_STOP = object()
_STOP_PRIORITY = math.inf  # sorts after every job: the work queued before a close is done


class Engine:
    """One per worker process: the model, loaded once, and the threads that batch jobs."""

    def __init__(
        self,
        model: Whisper,
        *,
        max_batch_rows: int | None = None,
        max_wait_ms: float = DEFAULT_MAX_WAIT_MS,
        sample_len: int | None = None,
        on_batch: Callable[[int], None] | None = None,
        announce_wait_ms: float = DEFAULT_ANNOUNCE_WAIT_MS,
        decode_threads: int | None = DEFAULT_CPU_DECODE_THREADS,
        ready_rows: int | None = None,
        lanes: int | None = None,
        exact_words: bool | None = None,
        step_mode: str = "eager",
    ) -> None:
        """`max_batch_rows` None: DEFAULT_MAX_BATCH_ROWS off CUDA, on CUDA what the device's
        free memory fits (:func:`worker.engine.sizing.rows_for_memory`). `exact_words` None:
        word alignment as transcribe() makes it on a CPU, batched on a GPU (see below).
        `step_mode`: how the decoder steps run (:data:`worker.engine.decoding.STEP_MODES`;
        "eager" until a GPU run says which is faster there)."""
        if max_batch_rows is not None and max_batch_rows < 1:
            raise ValueError("max_batch_rows must be >= 1")
        if ready_rows is not None and ready_rows < 0:
            raise ValueError("ready_rows must be >= 0")
        if lanes is not None and lanes < 1:
            raise ValueError("lanes must be >= 1")
        self.model = model
        self.device = next(model.parameters()).device
        self.fp16 = self.device.type == "cuda"
        # On a GPU the log-mel is made there too; on a CPU exactly as transcribe() makes it.
        self.mel_device: torch.device | None = self.device if self.fp16 else None
        self.dtype = torch.float16 if self.fp16 else torch.float32
        self.lanes = lanes or default_lanes(self.device)
        # torch threads of each lane: the process's share, so lanes never oversubscribe cores
        self._all_threads = torch.get_num_threads()
        self.lane_threads = max(1, self._all_threads // self.lanes)
        # Windows per encoder call: all of them on a GPU; on a CPU one at a time, which is
        # faster there (its activations stay in cache: 202-210 ms a window against 254-261 ms
        # in calls of 16 on the 2-core EPYC, bench/cpu_choices) and is the very computation
        # transcribe() makes.
        self.encoder_chunk: int | None = CPU_ENCODER_CHUNK if self.device.type == "cpu" else None
        # Word alignment (worker.engine.alignment): on a CPU each window alone, re-encoded,
        # on as many torch threads as transcribe() has alone, since fp32 products there have
        # other last bits for another row or thread count and word times are compared with
        # transcribe()'s bit for bit (the other lane's cores are shared for that while). On
        # a GPU, whose fp16 differs per batch shape anyway, all rows in one forward.
        self.exact_words = self.device.type == "cpu" if exact_words is None else exact_words
        self.word_threads: int | None = self._all_threads if self.exact_words else None
        # tokens sampled per window at most: whisper's default, smaller only for benchmarks
        self.sample_len = sample_len or model.dims.n_text_ctx // 2
        self.decoder = self._load_decoder()
        self.decoder.set_step_mode(step_mode)
        # Measured once the model and the decoder's copy of its matrices are on the device.
        self.max_batch_rows = max_batch_rows or self._default_batch_rows()
        # Jobs the worker may hand in at once: a batch per lane, plus the ones waiting
        # (claimed, audio loaded) so that the next window starts full however long the tasks
        # of a finished window take to save results and claim their replacements. None: one
        # more batch.
        self.ready_rows = self.max_batch_rows if ready_rows is None else ready_rows
        self.max_in_flight = self.lanes * self.max_batch_rows + self.ready_rows
        # Told the rows of every decode pass (the worker's batch-size metric); no metrics here.
        self.on_batch = on_batch
        self.max_wait_s = max_wait_ms / 1000
        self.announce_wait_s = announce_wait_ms / 1000
        # None: torch's own count (on CUDA the host threads only launch kernels)
        self.decode_threads = decode_threads if self.device.type == "cpu" else None
        self.announced = 0  # jobs announced and not yet submitted or withdrawn
        self._announce_lock = threading.Lock()
        self._announcing = threading.local()  # .open: this thread has an announcement
        self._suppress: dict[tuple[int, str], tuple[int, ...]] = {}
        # Cumulative counters of the lanes: read by benchmarks, logged now and then.
        self.stats = EngineStats()
        # (-priority, arrival, item): the highest priority first, then arrival order; a lane
        # takes a job only when it has room in its next window.
        self._inbox: queue.PriorityQueue[tuple[float, int, Any]] = queue.PriorityQueue()
        self._arrival = itertools.count()
        self._model_lock = ModelLock()
        # Jobs only whisper's own transcribe() can run (best_of > 1 when sampling) run
        # beside the lanes, one at a time, on a copy of the model made at the first of
        # them: transcribe() hooks the modules of the model it runs (word timestamps), so on
        # the shared one it had to stop every lane.
        self._exact_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="whisperq-exact")
        self._exact_model: Whisper | None = None
        self._threads = [
            threading.Thread(target=self._run, name=f"whisperq-engine-{i}", daemon=True)
            for i in range(self.lanes)
        ]
        for t in self._threads:
            t.start()

    def _load_decoder(self) -> BatchDecoder:
        """The batched decoder over the model's weights, and (on a CPU) whichever vocabulary
        projection is faster here, timed on a lane's threads (:attr:`projection`)."""
        from whisper.tokenizer import get_tokenizer

        model = self.model
        tokenizer = get_tokenizer(
            model.is_multilingual, num_languages=model.num_languages, language="en"
        )
        decoder = BatchDecoder(model, self.dtype, tokenizer)
        with torch_threads(self.lane_threads):
            self.projection = decoder.pick_projection()
        return decoder

    def _default_batch_rows(self) -> int:
        rows = default_batch_rows(
            self.device, self.model.dims, self.dtype, fixed=DEFAULT_MAX_BATCH_ROWS
        )
        if self.device.type == "cuda":
            per_row = bytes_per_row(self.model.dims, self.dtype)
            log.info(
                "engine: %d rows per window from the free device memory (%.0f MiB per row)",
                rows,
                per_row / 2**20,
            )
        return rows

    # ------------------------------------------------------------------ the seam

    def submit(self, job: EngineJob) -> Future[EngineResult]:
        """Queue a job. It ends this thread's announcement, if any (the job it announced has
        arrived, so it is no longer waited for)."""
        fut: Future[EngineResult] = Future()
        # The log-mel is made here, on the submitting thread (one torch thread: a Celery task
        # beside the lanes, several side by side), so the lanes never wait for it; if it
        # fails, this job alone fails.
        try:
            with torch_threads(1):
                mel = log_mel(job.audio, self.model.dims.n_mels, self.mel_device)
        except Exception as exc:
            fut.set_exception(exc)
        else:
            self.stats.add_log_mel(mel[1])
            self._inbox.put((-job.priority, next(self._arrival), (job, fut, mel)))
        self.withdraw()
        return fut

    def announce(self) -> None:
        """This thread's task has a job on its way (waiting for a claim slot, claiming, or
        loading its audio): a window about to start short of max_batch_rows waits for it, up
        to announce_wait_ms. One announcement per thread at most (a Celery task is a thread);
        it ends with this thread's next :meth:`submit` or :meth:`withdraw`."""
        with self._announce_lock:
            if getattr(self._announcing, "open", False):
                return
            self._announcing.open = True
            self.announced += 1

    def withdraw(self) -> None:
        """End this thread's announcement, if it has one."""
        with self._announce_lock:
            if not getattr(self._announcing, "open", False):
                return
            self._announcing.open = False
            self.announced -= 1

    @contextlib.contextmanager
    def announcing(self) -> Iterator[None]:
        """An announcement for the block (ended early by a submit)."""
        self.announce()
        try:
            yield
        finally:
            self.withdraw()

    def close(self, timeout: float | None = None) -> None:
        """Stop the lanes once the jobs already queued are done."""
        for _ in self._threads:  # after every queued job: a stop sorts last
            self._inbox.put((_STOP_PRIORITY, next(self._arrival), _STOP))
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self._threads:
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        self._exact_pool.shutdown(wait=False)  # an exact job handed over still ends
        self.stats.log(force=True)

    def transcribe(self, job: EngineJob) -> EngineResult:
        """Sequential openai-whisper ``transcribe()`` of one job: the reference semantics
        (waits for the lanes' windows in progress: it hooks the shared model)."""
        with self._model_lock.exclusive():
            return exact.transcribe(self.model, job)

    def suppress_ids(self, tokenizer: Tokenizer, suppress_tokens: str) -> tuple[int, ...]:
        key = (id(tokenizer.encoding), suppress_tokens)
        ids = self._suppress.get(key)
        if ids is None:
            ids = self._suppress[key] = suppress_list(tokenizer, suppress_tokens)
        return ids

    # ------------------------------------------------------------------ a lane

    def _run(self) -> None:
        """One lane, on its share of torch's threads (set per thread). Each window takes up
        to max_batch_rows jobs from the shared queue, highest priority and oldest first, and
        puts back those with windows left: a job is not tied to a lane, so a lane whose jobs
        ended takes over the next windows of the other lane's long files instead of idling
        (it idled 22 % of a 64-client run while they were sticky)."""
        torch.set_num_threads(self.lane_threads)
        while True:
            if self._inbox.empty():  # going idle: the counters of the burst that just ended
                self.stats.log_if_new_windows()
            active: list[JobState] = []
            stopping = self._admit(active, block=True)
            if stopping:
                if not active:
                    return
                # Taken beside jobs: this lane's stop waits until they are done.
                self._inbox.put((_STOP_PRIORITY, next(self._arrival), _STOP))
            self._poll_stops(active)
            for state in [s for s in active if not batched(s.opts)]:
                active.remove(state)
                self._exact_pool.submit(self._run_exact, state)
            if not active:
                continue
            active.sort(key=lambda s: (-s.job.priority, s.seq))
            try:
                with self._model_lock.shared():
                    self._step_window(active)
            except BaseException as exc:  # handed to the waiting tasks, never lost here
                log.exception("engine batch failed")
                for s in active:
                    s.fail(exc)
                continue
            for s in active:
                if s.done:
                    s.succeed(s.result())
            self._requeue(s for s in active if not s.done)
            self.stats.log()

    def _requeue(self, states: Iterable[JobState]) -> None:
        """Back into the shared queue, in their first place (priority, then arrival)."""
        for s in states:
            self._inbox.put((-s.job.priority, s.seq, s))

    def _admit(self, active: list[JobState], block: bool) -> bool:
        """Move new jobs in; True once a stop was taken. An idle engine waits up to max_wait
        for a batch to fill; a window about to start short of max_batch_rows waits up to
        announce_wait for jobs the worker has announced (claimed, audio still loading), which
        would otherwise miss it and run in a window of their own: on a 2-core CPU that halves
        the rows per decoder step."""
        deadline: float | None = None
        fill_until: float | None = None
        # Up to a window's rows: the rest stay queued, highest priority first, for the next
        # window or another lane.
        while len(active) < self.max_batch_rows:
            if block and not active:
                try:  # queued work (other jobs, or windows left of this lane's) starts at once
                    _, arrival, item = self._inbox.get_nowait()
                except queue.Empty:  # idle: the first arrival waits max_wait for company
                    _, arrival, item = self._inbox.get()
                    deadline = time.monotonic() + self.max_wait_s
            else:
                try:  # whatever is already queued joins, however long admission took
                    _, arrival, item = self._inbox.get_nowait()
                except queue.Empty:
                    now = time.monotonic()
                    wait = -1.0 if deadline is None else deadline - now
                    if self.announce_wait_s > 0 and self.announced > 0:
                        fill_until = fill_until or now + self.announce_wait_s
                        # polled: the count drops when a job arrives or is withdrawn
                        wait = max(wait, min(fill_until - now, ANNOUNCE_POLL_S))
                    if wait <= 0:
                        break
                    try:
                        _, arrival, item = self._inbox.get(timeout=wait)
                    except queue.Empty:
                        continue
            if item is _STOP:
                return True
            self._take(active, arrival, item)
        return False

    def _take(self, active: list[JobState], arrival: int, item: Any) -> None:
        """One queue item into the window: a job with windows left, or a new job (checked,
        and its state made, unless its task gave up on it)."""
        if isinstance(item, JobState):  # a job with windows left, put back by a lane
            active.append(item)
            return
        job, fut, (mel, mel_s) = item
        if not fut.set_running_or_notify_cancel():
            return
        try:
            check_options(self.model, job.options)
            multilingual = self.model.is_multilingual
            active.append(JobState(job, fut, arrival, mel, mel_s, multilingual=multilingual))
        except BaseException as exc:
            fut.set_exception(exc)

    def _poll_stops(self, active: list[JobState]) -> None:
        """Ask each job's stop check (between windows): a stopped job leaves the window."""
        for s in list(active):
            if s.job.stop_check is None:
                continue
            try:
                reason = s.job.stop_check()
            except Exception as exc:  # a broken check must not take the batch down
                active.remove(s)
                s.fail(exc)
                continue
            if reason:
                active.remove(s)
                s.fail(EngineStopped(reason, max(0, round(s.runtime_s * 1000))))

    # ------------------------------------------------------------------ model work

    def _step_window(self, states: list[JobState]) -> None:
        """The current window of every job in `states` (:func:`windows.step_window`)."""
        windows.step_window(self, states)

    def _encode(self, mels: list[torch.Tensor]) -> torch.Tensor:
        """Encoder features of the windows (a method: bench/gpu_profile.py times it)."""
        return windows.encode(self, mels)

    def _run_exact(self, state: JobState) -> None:
        """best_of > 1 when sampling: openai-whisper's transcribe(), one job, on the exact
        thread and its own copy of the model (its hooks fire nowhere else), with as many
        torch threads as transcribe() has alone: another count sums in another order, and
        its last bits can move a word time or a silence-threshold decision."""
        try:
            with torch_threads(self._all_threads):
                self._run_exact_alone(state, state.job.stop_check)
        except BaseException as exc:  # handed to the waiting task, never lost here
            log.exception("exact job failed")
            state.fail(exc)

    def _run_exact_alone(
        self, state: JobState, stop_check: Callable[[], str | None] | None
    ) -> None:
        """Run on the exact thread (the only user of :meth:`exact_model`)."""
        exact.run_exact_alone(self.exact_model(), state, stop_check, self.stats)

    def exact_model(self) -> Whisper:
        """The exact path's copy of the model, made on first use (as much memory again as
        the model: the batched engine never needs it)."""
        if self._exact_model is None:
            self._exact_model = copy.deepcopy(self.model)
        return self._exact_model
