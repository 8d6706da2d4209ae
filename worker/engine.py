"""The engine: pure numerics behind the worker–engine seam.

Each worker process holds one :class:`Engine`. It owns the model and its lanes (threads that
run it, each on its share of torch's threads); tasks (several in flight per process) call
:meth:`Engine.submit` and wait on the future. A lane decodes the current 30 s window of up
to ``max_batch_rows`` jobs as one batch (encoder and decoder, :mod:`worker.batch_decoding`);
jobs join and leave between windows, and lanes run their windows side by side.
Per job it keeps ``whisper.transcribe()``'s long-form semantics (:class:`_JobState` follows
``whisper/transcribe.py`` line by line): seek from timestamp tokens, temperature fallback
(only failing rows re-decode, reusing their encoder output), no-speech skips, prompts from
previous text, initial prompt, language detection (batched), beam search (``patience``: the
beam jobs' windows at temperature 0 as a pass of their own, each job's beams as rows).

Word timestamps run through openai-whisper's own ``transcribe()`` in a lane, one job at a
time and with the model to itself: exact openai-whisper behaviour, not batched. No
database, Celery or HTTP here.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from app.jobs.options import BEAM_SIZE, TranscribeOptions
from worker.batch_decoding import BatchDecoder, RowResult, RowSpec, suppress_list

if TYPE_CHECKING:
    from whisper.model import Whisper
    from whisper.tokenizer import Tokenizer

log = logging.getLogger(__name__)

SAMPLE_RATE = 16_000
ENCODER_TOKENS_PER_SECOND = 50  # one encoder position per 20 ms of audio
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
# How often the lanes log their cumulative counters (where the time went).
STATS_LOG_INTERVAL_S = 60.0
_WORD_PUNCT_DEFAULTS = {
    "prepend_punctuations": "\"'“¿([{-",
    "append_punctuations": "\"'.。,，!！?？:：”)]}、",
}


class EngineInputError(ValueError):
    """The job cannot run as asked (e.g. an option the model cannot honour)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class EngineStopped(Exception):  # noqa: N818 (the name the worker imports)
    """The job's ``stop_check`` asked to stop it; raised at a window boundary."""

    def __init__(self, reason: str, runtime_ms: int) -> None:
        super().__init__(f"stopped: {reason} after {runtime_ms} ms of model time")
        self.reason = reason
        self.runtime_ms = runtime_ms


@dataclass(frozen=True)
class EngineJob:
    audio: np.ndarray  # float32 mono, 16 kHz
    options: TranscribeOptions
    priority: int = 0  # higher goes first into a batch (the worker passes 1 for interactive)
    # Polled between windows, never per token: a reason string stops the job there.
    stop_check: Callable[[], str | None] | None = None


@dataclass(frozen=True)
class Word:
    word: str
    start: float
    end: float
    probability: float

    def to_json(self) -> dict[str, Any]:
        return {
            "word": self.word,
            "start": self.start,
            "end": self.end,
            "probability": self.probability,
        }


@dataclass(frozen=True)
class Segment:
    id: int
    start: float
    end: float
    text: str
    seek: int = 0
    tokens: tuple[int, ...] = ()
    temperature: float = 0.0
    avg_logprob: float = 0.0
    compression_ratio: float = 0.0
    no_speech_prob: float = 0.0
    words: tuple[Word, ...] | None = None  # only with word_timestamps

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "seek": self.seek,
            "start": self.start,
            "end": self.end,
            "text": self.text,
            "tokens": list(self.tokens),
            "temperature": self.temperature,
            "avg_logprob": self.avg_logprob,
            "compression_ratio": self.compression_ratio,
            "no_speech_prob": self.no_speech_prob,
        }
        if self.words is not None:
            out["words"] = [w.to_json() for w in self.words]
        return out

    @classmethod
    def from_whisper(cls, s: dict[str, Any]) -> Segment:
        words = s.get("words")
        return cls(
            id=int(s["id"]),
            seek=int(s["seek"]),
            start=round(float(s["start"]), 3),
            end=round(float(s["end"]), 3),
            text=str(s["text"]),
            tokens=tuple(int(t) for t in s["tokens"]),
            temperature=float(s["temperature"]),
            avg_logprob=float(s["avg_logprob"]),
            compression_ratio=float(s["compression_ratio"]),
            no_speech_prob=float(s["no_speech_prob"]),
            words=None
            if words is None
            else tuple(
                Word(
                    word=str(w["word"]),
                    start=round(float(w["start"]), 3),
                    end=round(float(w["end"]), 3),
                    probability=round(float(w["probability"]), 4),
                )
                for w in words
            ),
        )


@dataclass(frozen=True)
class EngineResult:
    text: str
    segments: tuple[Segment, ...]
    language: str
    runtime_ms: int  # this job's share of the batches it was in (README: metering)
    tokens_generated: int  # decoder output tokens kept in the transcript (text + timestamps)
    tokens_input: int  # encoder positions the audio occupies (20 ms each)
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


@dataclass
class _Decoded:
    """whisper's DecodingResult, the fields transcribe() reads."""

    tokens: list[int]
    text: str
    avg_logprob: float
    no_speech_prob: float
    temperature: float
    compression_ratio: float


_STOP = object()
_STOP_PRIORITY = math.inf  # sorts after every job: the work queued before a close is done


def _batched(opts: TranscribeOptions) -> bool:
    """Whether the batched windows give this job transcribe()'s result; the rest run
    whisper's own transcribe() (the exact path)."""
    if getattr(opts, "word_timestamps", False):
        return False
    if getattr(opts, "hallucination_silence_threshold", None) is not None:
        return False  # works on word timestamps (the API refuses it without them)
    if getattr(opts, "clip_timestamps", "0") != "0":
        return False  # the batched seek loop walks the whole file
    # Several samples per window at t > 0 draw from whisper's random stream in its own order:
    # the exact path keeps a seeded result equal to transcribe()'s.
    best_of = getattr(opts, "best_of", None)
    return not (best_of is not None and best_of > 1 and any(t > 0 for t in opts.temperatures()))


class _JobState:
    """One job's long-form loop, whisper.transcribe() split at its decode call."""

    def __init__(
        self,
        engine: Engine,
        job: EngineJob,
        fut: Future[EngineResult],
        seq: int,
        mel: torch.Tensor,
        mel_s: float,
    ):
        self.job, self.fut, self.seq = job, fut, seq
        self.opts = job.options
        self.mel = mel  # made by submit(), on the submitting thread
        self.content_frames = mel.shape[-1] - 3000
        self.runtime_s = mel_s  # the job's own host work, charged to it alone
        self.language: str | None = self.opts.language
        if self.language is None and not engine.model.is_multilingual:
            self.language = "en"
        self.seek = 0
        self.all_tokens: list[int] = []
        self.all_segments: list[dict[str, Any]] = []
        self.prompt_reset_since = 0
        self.initial_prompt_tokens: list[int] = []
        self.temps = self.opts.temperatures()
        self.tokenizer: Tokenizer | None = None
        self.window: dict[str, Any] = {}

    @property
    def done(self) -> bool:
        return self.tokenizer is not None and (self.seek >= self.content_frames)

    def set_language(self, engine: Engine, language: str) -> None:
        from whisper.tokenizer import get_tokenizer

        self.language = language
        model = engine.model
        self.tokenizer = get_tokenizer(
            model.is_multilingual,
            num_languages=model.num_languages,
            language=language,
            task=self.opts.task,
        )
        if self.opts.initial_prompt is not None:
            self.initial_prompt_tokens = self.tokenizer.encode(
                " " + self.opts.initial_prompt.strip()
            )
            self.all_tokens.extend(self.initial_prompt_tokens)

    def detection_mel(self) -> torch.Tensor:
        from whisper.audio import pad_or_trim

        mel: torch.Tensor = pad_or_trim(self.mel, 3000)
        return mel

    def next_window(self, n_text_ctx: int) -> tuple[torch.Tensor, list[int]]:
        from whisper.audio import pad_or_trim

        segment_size = min(3000, self.content_frames - self.seek)
        mel_segment = pad_or_trim(self.mel[:, self.seek : self.seek + segment_size], 3000)
        self.window = {"segment_size": segment_size, "seek": self.seek}
        if self.opts.carry_initial_prompt:
            # transcribe()'s own slicing, kept as written: a prompt that fills half the
            # context leaves a bound <= 0, which slices from the start, then the cut below
            # keeps the last tokens
            initial_tokens = self.initial_prompt_tokens
            bound = n_text_ctx // 2 - 1 - len(initial_tokens)
            ignored = max(len(initial_tokens), self.prompt_reset_since)
            prompt = initial_tokens + self.all_tokens[ignored:][-bound:]
        else:
            prompt = self.all_tokens[self.prompt_reset_since :]
        assert self.tokenizer is not None
        sot = list(self.tokenizer.sot_sequence)
        if prompt:
            initial = [self.tokenizer.sot_prev, *prompt[-(n_text_ctx // 2 - 1) :], *sot]
        else:
            initial = sot
        self.window["initial"] = tuple(initial)
        self.window["sot_index"] = initial.index(self.tokenizer.sot)
        return mel_segment, initial

    def row(self, engine: Engine, temperature: float) -> RowSpec:
        assert self.tokenizer is not None
        return RowSpec(
            initial_tokens=self.window["initial"],
            sot_index=self.window["sot_index"],
            suppress=engine.suppress_ids(self.tokenizer, self.opts.suppress_tokens),
            temperature=temperature,
        )

    def to_decoded(self, r: RowResult, temperature: float) -> _Decoded:
        from whisper.utils import compression_ratio

        assert self.tokenizer is not None
        text = self.tokenizer.decode(r.tokens).strip()
        return _Decoded(
            tokens=r.tokens,
            text=text,
            avg_logprob=r.sum_logprob / (len(r.tokens) + 1),
            no_speech_prob=r.no_speech_prob,
            temperature=temperature,
            compression_ratio=compression_ratio(text),
        )

    def needs_fallback(self, d: _Decoded) -> bool:
        """decode_with_fallback's test, for one result."""
        o = self.opts
        needs = False
        if o.compression_ratio_threshold is not None and (
            d.compression_ratio > o.compression_ratio_threshold
        ):
            needs = True  # too repetitive
        if o.logprob_threshold is not None and d.avg_logprob < o.logprob_threshold:
            needs = True  # average log probability is too low
        if (
            o.no_speech_threshold is not None
            and d.no_speech_prob > o.no_speech_threshold
            and o.logprob_threshold is not None
            and d.avg_logprob < o.logprob_threshold
        ):
            needs = False  # silence
        return needs

    def accept(self, result: _Decoded) -> None:
        """The rest of transcribe()'s loop body, after decode_with_fallback."""
        tokenizer = self.tokenizer
        assert tokenizer is not None
        o = self.opts
        input_stride = 2  # mel frames per output token
        time_precision = 0.02
        seek = self.window["seek"]
        segment_size = self.window["segment_size"]
        time_offset = float(seek * 160 / SAMPLE_RATE)
        segment_duration = segment_size * 160 / SAMPLE_RATE
        tokens = result.tokens

        if o.no_speech_threshold is not None:
            should_skip = result.no_speech_prob > o.no_speech_threshold
            if o.logprob_threshold is not None and result.avg_logprob > o.logprob_threshold:
                should_skip = False
            if should_skip:
                self.seek += segment_size
                return

        def new_segment(start: float, end: float, toks: list[int]) -> dict[str, Any]:
            return {
                "seek": seek,
                "start": start,
                "end": end,
                "text": tokenizer.decode([t for t in toks if t < tokenizer.eot]),
                "tokens": toks,
                "temperature": result.temperature,
                "avg_logprob": result.avg_logprob,
                "compression_ratio": result.compression_ratio,
                "no_speech_prob": result.no_speech_prob,
            }

        # transcribe()'s tensor code on a list: host work per window, no torch ops
        current: list[dict[str, Any]] = []
        tb = tokenizer.timestamp_begin
        timestamp_tokens = [t >= tb for t in tokens]
        single_timestamp_ending = timestamp_tokens[-2:] == [False, True]
        consecutive = [
            i + 1 for i in range(len(tokens) - 1) if timestamp_tokens[i] and timestamp_tokens[i + 1]
        ]
        if consecutive:
            slices = list(consecutive)
            if single_timestamp_ending:
                slices.append(len(tokens))
            last_slice = 0
            for current_slice in slices:
                sliced = tokens[last_slice:current_slice]
                current.append(
                    new_segment(
                        time_offset + (sliced[0] - tb) * time_precision,
                        time_offset + (sliced[-1] - tb) * time_precision,
                        sliced,
                    )
                )
                last_slice = current_slice
            if single_timestamp_ending:
                self.seek += segment_size
            else:
                self.seek += (tokens[last_slice - 1] - tb) * input_stride
        else:
            duration = segment_duration
            timestamps = [t for t in tokens if t >= tb]
            if timestamps and timestamps[-1] != tb:
                duration = (timestamps[-1] - tb) * time_precision
            current.append(new_segment(time_offset, time_offset + duration, list(tokens)))
            self.seek += segment_size

        for segment in current:
            if segment["start"] == segment["end"] or segment["text"].strip() == "":
                segment["text"] = ""
                segment["tokens"] = []
        self.all_segments.extend(
            {"id": i, **segment} for i, segment in enumerate(current, start=len(self.all_segments))
        )
        self.all_tokens.extend(t for segment in current for t in segment["tokens"])
        if not o.condition_on_previous_text or result.temperature > 0.5:
            # do not feed the prompt tokens if a high temperature was used
            self.prompt_reset_since = len(self.all_tokens)

    def result(self) -> EngineResult:
        assert self.tokenizer is not None and self.language is not None
        text = self.tokenizer.decode(self.all_tokens[len(self.initial_prompt_tokens) :])
        raw = {"text": text, "segments": self.all_segments, "language": self.language}
        return _result_of(raw, len(self.job.audio), self.runtime_s)


def log_mel(audio: np.ndarray, n_mels: int) -> tuple[torch.Tensor, float]:
    """The log-mel of the whole file, padded with 30 s of silence, as transcribe() makes it
    (the log-mel floor is set over the whole file, so it cannot be made per window), and the
    seconds it took."""
    from whisper.audio import N_SAMPLES, log_mel_spectrogram

    start = time.perf_counter()
    samples = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))
    mel = log_mel_spectrogram(samples, n_mels, padding=N_SAMPLES)
    return mel, time.perf_counter() - start


def _result_of(raw: dict[str, Any], n_samples: int, runtime_s: float) -> EngineResult:
    segments = tuple(Segment.from_whisper(s) for s in raw["segments"])
    return EngineResult(
        text=str(raw["text"]).strip(),
        segments=segments,
        language=str(raw["language"]),
        runtime_ms=max(1, round(runtime_s * 1000)),
        tokens_generated=sum(len(s["tokens"]) for s in raw["segments"]),
        tokens_input=math.ceil(n_samples / SAMPLE_RATE * ENCODER_TOKENS_PER_SECOND),
        raw=raw,
    )


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text
    )


class Engine:
    """One per worker process: the model, loaded once, and the thread that batches jobs."""

    def __init__(
        self,
        model: Whisper,
        *,
        max_batch_rows: int = DEFAULT_MAX_BATCH_ROWS,
        max_wait_ms: float = DEFAULT_MAX_WAIT_MS,
        sample_len: int | None = None,
        on_batch: Callable[[int], None] | None = None,
        announce_wait_ms: float = DEFAULT_ANNOUNCE_WAIT_MS,
        decode_threads: int | None = DEFAULT_CPU_DECODE_THREADS,
        ready_rows: int | None = None,
        lanes: int | None = None,
    ) -> None:
        from whisper.tokenizer import get_tokenizer

        if max_batch_rows < 1:
            raise ValueError("max_batch_rows must be >= 1")
        if ready_rows is not None and ready_rows < 0:
            raise ValueError("ready_rows must be >= 0")
        if lanes is not None and lanes < 1:
            raise ValueError("lanes must be >= 1")
        self.model = model
        self.device = next(model.parameters()).device
        self.fp16 = self.device.type == "cuda"
        self.dtype = torch.float16 if self.fp16 else torch.float32
        self.max_batch_rows = max_batch_rows
        self.lanes = lanes or default_lanes(self.device)
        # torch threads of each lane: the process's share, so lanes never oversubscribe cores
        self._all_threads = torch.get_num_threads()
        # Windows per encoder call: all of them on a GPU; on a CPU one at a time, which is
        # faster there (its activations stay in cache: 202-210 ms a window against 254-261 ms
        # in calls of 16 on the 2-core EPYC, bench/cpu_choices) and is the very computation
        # transcribe() makes.
        self.encoder_chunk: int | None = CPU_ENCODER_CHUNK if self.device.type == "cpu" else None
        self.lane_threads = max(1, self._all_threads // self.lanes)
        # Jobs the worker may hand in at once: a batch per lane, plus the ones waiting
        # (claimed, audio loaded) so that the next window starts full however long the tasks
        # of a finished window take to save results and claim their replacements. None: one
        # more batch.
        self.ready_rows = max_batch_rows if ready_rows is None else ready_rows
        self.max_in_flight = self.lanes * max_batch_rows + self.ready_rows
        # Told the rows of every decode pass (the worker's batch-size metric); no metrics here.
        self.on_batch = on_batch
        self.max_wait_s = max_wait_ms / 1000
        self.announce_wait_s = announce_wait_ms / 1000
        # None: torch's own count (on CUDA the host threads only launch kernels)
        self.decode_threads = decode_threads if self.device.type == "cpu" else None
        self.announced = 0  # jobs announced and not yet submitted or withdrawn
        self._announce_lock = threading.Lock()
        self._announcing = threading.local()  # .open: this thread has an announcement
        # tokens sampled per window at most: whisper's default, smaller only for benchmarks
        self.sample_len = sample_len or model.dims.n_text_ctx // 2
        self._tokenizer = get_tokenizer(
            model.is_multilingual, num_languages=model.num_languages, language="en"
        )
        self.decoder = BatchDecoder(model, self.dtype, self._tokenizer)
        # On a CPU, whichever vocabulary projection is faster here, timed on a lane's threads.
        with _torch_threads(self.lane_threads):
            self.projection = self.decoder.pick_projection()
        self._suppress: dict[tuple[int, str], tuple[int, ...]] = {}
        # Cumulative counters of the lanes (seconds, windows, passes, rows, steps): read by
        # benchmarks, logged every STATS_LOG_INTERVAL_S; written under _stats_lock.
        self.stats: dict[str, float] = dict.fromkeys(
            (
                "windows",
                "log_mel_s",
                "encoder_calls",
                "encoder_s",
                "decode_passes",
                "decode_rows",
                "decode_steps",
                "decode_row_steps",
                "decode_row_slots",
                "decode_s",
                "beam_passes",
                "beam_jobs",
                "beam_s",
                "exact_jobs",
                "exact_s",
            ),
            0.0,
        )
        self._stats_logged = time.monotonic()
        self._stats_at = 0.0  # windows when last logged
        self._stats_lock = threading.Lock()
        # (-priority, arrival, item): the highest priority first, then arrival order; a lane
        # takes a job only when it has room in its next window.
        self._inbox: queue.PriorityQueue[tuple[float, int, Any]] = queue.PriorityQueue()
        self._arrival = itertools.count()
        self._model_lock = _ModelLock()
        self._threads = [
            threading.Thread(target=self._run, name=f"whisperq-engine-{i}", daemon=True)
            for i in range(self.lanes)
        ]
        for t in self._threads:
            t.start()

    # ------------------------------------------------------------------ the seam

    def submit(self, job: EngineJob) -> Future[EngineResult]:
        """Queue a job. It ends this thread's announcement, if any (the job it announced has
        arrived, so it is no longer waited for)."""
        fut: Future[EngineResult] = Future()
        # The log-mel is made here, on the submitting thread (one torch thread: a Celery task
        # beside the lanes, several side by side), so the lanes never wait for it; if it
        # fails, this job alone fails.
        try:
            with _torch_threads(1):
                mel = log_mel(job.audio, self.model.dims.n_mels)
        except Exception as exc:
            fut.set_exception(exc)
        else:
            self._count(log_mel_s=mel[1])
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
        self._log_stats(force=True)

    def _count(self, **deltas: float) -> None:
        with self._stats_lock:
            for name, value in deltas.items():
                self.stats[name] += value

    def suppress_ids(self, tokenizer: Tokenizer, suppress_tokens: str) -> tuple[int, ...]:
        key = (id(tokenizer.encoding), suppress_tokens)
        ids = self._suppress.get(key)
        if ids is None:
            ids = self._suppress[key] = suppress_list(tokenizer, suppress_tokens)
        return ids

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        """One lane, on its share of torch's threads (set per thread). Each window takes up
        to max_batch_rows jobs from the shared queue, highest priority and oldest first, and
        puts back those with windows left: a job is not tied to a lane, so a lane whose jobs
        ended takes over the next windows of the other lane's long files instead of idling
        (it idled 22 % of a 64-client run while they were sticky)."""
        torch.set_num_threads(self.lane_threads)
        while True:
            if self._inbox.empty():  # going idle: the counters of the burst that just ended
                self._log_stats(force=self._stats_at != self.stats["windows"])
            active: list[_JobState] = []
            stopping = self._admit(active, block=True)
            if stopping:
                if not active:
                    return
                # Taken beside jobs: this lane's stop waits until they are done.
                self._inbox.put((_STOP_PRIORITY, next(self._arrival), _STOP))
            self._poll_stops(active)
            exact = [s for s in active if not _batched(s.opts)]
            if exact:
                state = min(exact, key=lambda s: (-s.job.priority, s.seq))
                self._requeue(s for s in active if s is not state)
                self._run_exact(state)
                continue
            if not active:
                continue
            active.sort(key=lambda s: (-s.job.priority, s.seq))
            try:
                with self._model_lock.shared():
                    self._step_window(active)
            except BaseException as exc:  # handed to the waiting tasks, never lost here
                log.exception("engine batch failed")
                for s in active:
                    _fail(s, exc)
                continue
            for s in active:
                if s.done:
                    _succeed(s, s.result())
            self._requeue(s for s in active if not s.done)
            self._log_stats()

    def _requeue(self, states: Iterable[_JobState]) -> None:
        """Back into the shared queue, in their first place (priority, then arrival)."""
        for s in states:
            self._inbox.put((-s.job.priority, s.seq, s))

    def _log_stats(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._stats_logged < STATS_LOG_INTERVAL_S:
            return
        self._stats_logged = now
        st = self.stats
        self._stats_at = st["windows"]
        log.info(
            "engine: %d windows, log-mel %.1f s, encoder %d calls %.1f s, decode %d passes "
            "(%.1f rows each, %d steps, %.0f%% of row-steps live) %.1f s, of which beam search "
            "%d job-windows in %d passes %.1f s, exact %d jobs %.1f s",
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
            st["exact_jobs"],
            st["exact_s"],
        )

    def _admit(self, active: list[_JobState], block: bool) -> bool:
        """Move new jobs in. An idle engine waits up to max_wait for a batch to fill; a window
        about to start short of max_batch_rows waits up to announce_wait for jobs the worker
        has announced (claimed, audio still loading), which would otherwise miss it and run
        in a window of their own: on a 2-core CPU that halves the rows per decoder step."""
        deadline: float | None = None
        fill_until: float | None = None
        stop = False
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
                stop = True
                break
            if isinstance(item, _JobState):  # a job with windows left, put back by a lane
                active.append(item)
                continue
            job, fut, mel = item
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                self._check(job.options)
                active.append(_JobState(self, job, fut, arrival, *mel))
            except BaseException as exc:
                fut.set_exception(exc)
        return stop

    def _poll_stops(self, active: list[_JobState]) -> None:
        for s in list(active):
            if s.job.stop_check is None:
                continue
            try:
                reason = s.job.stop_check()
            except Exception as exc:  # a broken check must not take the batch down
                active.remove(s)
                _fail(s, exc)
                continue
            if reason:
                active.remove(s)
                _fail(s, EngineStopped(reason, max(0, round(s.runtime_s * 1000))))

    # ------------------------------------------------------------------ batched windows

    def _encode(self, mels: list[torch.Tensor]) -> torch.Tensor:
        start = time.perf_counter()
        with torch.inference_mode():
            mel = torch.stack(mels).to(self.device, self.dtype)
            chunk = self.encoder_chunk or len(mels)
            parts = [self.model.encoder(mel[i : i + chunk]) for i in range(0, len(mels), chunk)]
            features: torch.Tensor = parts[0] if len(parts) == 1 else torch.cat(parts)
        self._count(encoder_calls=1, encoder_s=time.perf_counter() - start)
        return features

    def _timed(self, states: list[_JobState], weights: list[float], fn: Callable[[], Any]) -> Any:
        """Run fn and charge its wall time to the jobs, in proportion to their weights."""
        start = time.perf_counter()
        out = fn()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        wall = time.perf_counter() - start
        total = sum(weights) or 1.0
        for s, w in zip(states, weights, strict=True):
            s.runtime_s += wall * w / total
        return out

    def _with_oom_split(self, fn: Callable[[list[int]], list[Any]], idx: list[int]) -> list[Any]:
        """Run fn over rows idx; out of memory splits the rows in two and retries each half."""
        try:
            return fn(idx)
        except BaseException as exc:
            if not _is_oom(exc) or len(idx) == 1:
                raise
            log.warning("out of memory at %d rows: splitting the batch", len(idx))
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            half = len(idx) // 2
            return self._with_oom_split(fn, idx[:half]) + self._with_oom_split(fn, idx[half:])

    def _detect(self, states: list[_JobState]) -> None:
        from whisper.tokenizer import get_tokenizer

        tokenizer = get_tokenizer(
            self.model.is_multilingual, num_languages=self.model.num_languages
        )

        def run(idx: list[int]) -> list[str]:
            with torch.inference_mode():
                sub = [states[i] for i in idx]
                features = self._timed(
                    sub, [1.0] * len(sub), lambda: self._encode([s.detection_mel() for s in sub])
                )
                _, probs = self._timed(
                    sub,
                    [1.0] * len(sub),
                    lambda: self.model.detect_language(features, tokenizer),
                )
            return [max(p, key=p.get) for p in probs]

        languages = self._with_oom_split(run, list(range(len(states))))
        for s, lang in zip(states, languages, strict=True):
            s.set_language(self, lang)

    def _step_window(self, states: list[_JobState]) -> None:
        """The current window of every job in `states`, decoded with fallback, in batches."""
        need = [s for s in states if s.tokenizer is None and s.language is None]
        if need:
            self._detect(need)
        for s in states:
            if s.tokenizer is None:
                assert s.language is not None
                s.set_language(self, s.language)
        states = [s for s in states if not s.done]
        if not states:
            return
        n_ctx = self.model.dims.n_text_ctx
        mels = [s.next_window(n_ctx)[0] for s in states]
        self._count(windows=len(states))

        def encode(idx: list[int]) -> list[torch.Tensor]:
            sub = [states[i] for i in idx]
            feats = self._timed(sub, [1.0] * len(sub), lambda: self._encode([mels[i] for i in idx]))
            return list(feats)

        features = self._with_oom_split(encode, list(range(len(states))))
        # temperature fallback: rows still failing re-decode at their next temperature
        level = [0] * len(states)
        final: list[_Decoded | None] = [None] * len(states)
        pending = list(range(len(states)))
        while pending:
            decoded = self._with_oom_split(
                lambda idx: self._decode_rows(states, features, level, idx), pending
            )
            still = []
            for i, d in zip(pending, decoded, strict=True):
                s = states[i]
                if s.needs_fallback(d) and level[i] + 1 < len(s.temps):
                    level[i] += 1
                    still.append(i)
                else:
                    final[i] = d
            pending = still
        for s, d in zip(states, final, strict=True):
            assert d is not None
            start = time.perf_counter()
            s.accept(d)
            s.runtime_s += time.perf_counter() - start

    def _decode_rows(
        self,
        states: list[_JobState],
        features: list[torch.Tensor],
        level: list[int],
        idx: list[int],
    ) -> list[_Decoded]:
        """One decoding pass per group of rows: beam search (patience, at temperature 0, as
        whisper runs it) and greedy or sampled rows (the rest, fallbacks of beam jobs
        included: whisper samples at t > 0 without beams)."""
        temps = {i: states[i].temps[level[i]] for i in idx}
        beams = [i for i in idx if states[i].opts.patience is not None and temps[i] == 0]
        beam_set = set(beams)
        single = [i for i in idx if i not in beam_set]
        out: dict[int, _Decoded] = {}
        for group, beam in ((single, False), (beams, True)):
            if group:
                decoded = self._decode_group(states, features, temps, group, beam)
                out.update(zip(group, decoded, strict=True))
        return [out[i] for i in idx]

    def _decode_group(
        self,
        states: list[_JobState],
        features: list[torch.Tensor],
        temps: dict[int, float],
        idx: list[int],
        beam: bool,
    ) -> list[_Decoded]:
        sub = [states[i] for i in idx]
        rows = [s.row(self, temps[i]) for s, i in zip(sub, idx, strict=True)]
        feats = torch.stack([features[i] for i in idx])
        start = time.perf_counter()
        with _torch_threads(self.decode_threads):
            if beam:
                results = self.decoder.decode_beam(
                    feats,
                    rows,
                    self.sample_len,
                    BEAM_SIZE,
                    [p for s in sub if (p := s.opts.patience) is not None],  # all of them
                    [s.opts.length_penalty for s in sub],
                )
            else:
                results = self.decoder.decode(feats, rows, self.sample_len)
        if self.on_batch is not None:
            self.on_batch(len(rows))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        wall = time.perf_counter() - start
        rows_per_job = BEAM_SIZE if beam else 1
        steps = max((r.steps for r in results), default=0) // rows_per_job
        row_steps = sum(r.steps for r in results)
        self._count(
            decode_passes=1,
            decode_rows=len(rows) * rows_per_job,
            decode_s=wall,
            decode_steps=steps,
            decode_row_steps=row_steps,
            decode_row_slots=steps * len(rows) * rows_per_job,
            **({"beam_passes": 1, "beam_jobs": len(rows), "beam_s": wall} if beam else {}),
        )
        # metering: a pass's wall time split by the decoder row-steps each job was live
        # (a beam job's steps count once per beam)
        total = row_steps or 1
        out = []
        for s, r, i in zip(sub, results, idx, strict=True):
            s.runtime_s += wall * r.steps / total
            out.append(s.to_decoded(r, temps[i]))
        return out

    # ------------------------------------------------------------------ exact path

    def _run_exact(self, state: _JobState) -> None:
        """Word timestamps: openai-whisper's transcribe(), one job, this thread."""
        stop_check = state.job.stop_check
        # Exclusive: whisper's transcribe() hooks the model's modules (this stop check, its
        # key/value cache), which another lane's encoder or language detection would fire.
        with self._model_lock.exclusive(), _torch_threads(self._all_threads):
            self._run_exact_alone(state, stop_check)

    def _run_exact_alone(
        self, state: _JobState, stop_check: Callable[[], str | None] | None
    ) -> None:
        """Run with the model lock held exclusively."""

        def at_window(*_: Any) -> None:
            # every decode() encodes its window first: a window boundary
            if stop_check is not None and (reason := stop_check()):
                raise _StopAtWindowError(reason)

        hook = self.model.encoder.register_forward_pre_hook(at_window)
        start = time.perf_counter()
        try:
            out = self._transcribe(state.job)
        except _StopAtWindowError as stop:
            spent = state.runtime_s + time.perf_counter() - start
            _fail(state, EngineStopped(stop.reason, round(spent * 1000)))
        except BaseException as exc:
            _fail(state, exc)
        else:
            raw = out.raw
            state.runtime_s += time.perf_counter() - start
            self._count(exact_jobs=1, exact_s=time.perf_counter() - start)
            _succeed(state, _result_of(raw, len(state.job.audio), state.runtime_s))
        finally:
            hook.remove()

    def _check(self, opts: TranscribeOptions) -> None:
        if not self.model.is_multilingual and (
            opts.task == "translate" or opts.language not in (None, "en")
        ):
            raise EngineInputError(
                "unsupported_option",
                "this server runs an English-only model: task=translate and languages other "
                "than 'en' are not available",
            )
        n_vocab = self.model.dims.n_vocab
        bad = [t for t in opts.suppress_token_ids() if t >= n_vocab]
        if bad:
            raise EngineInputError(
                "invalid_option",
                f"suppress_tokens: ids {bad} are outside the vocabulary (size {n_vocab})",
            )

    def transcribe(self, job: EngineJob) -> EngineResult:
        """Sequential openai-whisper ``transcribe()`` of one job: the reference semantics
        (waits for the lanes' windows in progress: it hooks the shared model)."""
        with self._model_lock.exclusive():
            return self._transcribe(job)

    def _transcribe(self, job: EngineJob) -> EngineResult:
        import whisper

        opts = job.options
        self._check(opts)
        audio = torch.from_numpy(np.ascontiguousarray(job.audio, dtype=np.float32))
        kwargs = opts.transcribe_kwargs(fp16=self.fp16)
        kwargs["clip_timestamps"] = _clips_within(opts.clip_seconds(), len(job.audio))
        if getattr(opts, "word_timestamps", False):
            kwargs["word_timestamps"] = True
            for name, default in _WORD_PUNCT_DEFAULTS.items():
                kwargs.setdefault(name, getattr(opts, name, default))
        start = time.perf_counter()
        with torch.inference_mode():
            out = whisper.transcribe(self.model, audio, **kwargs)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return _result_of(out, len(job.audio), time.perf_counter() - start)


def _clips_within(clips: list[float], n_samples: int) -> list[float]:
    """whisper's clip list, cut at the end of the audio. Past the end a clip's window is
    empty (segment_size 0 or below), so transcribe() can decode it again and again without
    moving on; a clip that starts after the end is skipped by whisper anyway. Unchanged for
    clips inside the audio."""
    content_frames = n_samples // 160  # transcribe()'s mel frames of the audio itself
    frames_per_s = SAMPLE_RATE // 160
    end_s = content_frames / frames_per_s
    kept: list[float] = []
    for i in range(0, len(clips), 2):
        start, end = clips[i], clips[i + 1] if i + 1 < len(clips) else None
        if round(start * frames_per_s) >= content_frames:
            break  # the clips increase (the API checks): every later one is past the end too
        kept.append(start)
        if end is not None:
            kept.append(end if round(end * frames_per_s) <= content_frames else end_s)
    if not kept and clips:
        return [end_s, end_s]  # nothing to transcribe; an empty list would mean the whole file
    return kept


def default_lanes(device: torch.device) -> int:
    """Lanes (engine threads, each with its own windows) when not configured. On a CPU two:
    one lane's decoder steps are hundreds of small, memory-bound ops while the other's
    encoder is compute-bound, so two lanes on half the cores each keep every core on the
    model (bench/RESULTS.md). On CUDA one: the GPU runs one stream of kernels anyway."""
    if device.type != "cpu":
        return 1
    return 2 if torch.get_num_threads() >= 2 else 1


class _ModelLock:
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


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
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


class _StopAtWindowError(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _succeed(state: _JobState, result: EngineResult) -> None:
    if not state.fut.done():
        state.fut.set_result(result)


def _fail(state: _JobState, exc: BaseException) -> None:
    if not state.fut.done():
        state.fut.set_exception(exc)
