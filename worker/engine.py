"""The engine: pure numerics behind the worker–engine seam.

Each worker process holds one :class:`Engine`. It owns the model and one thread that runs it;
tasks (several in flight per process) call :meth:`Engine.submit` and wait on the future. This
first engine runs its jobs one at a time; a batched engine replaces what sits behind
``submit`` without any change to the tasks. No database, Celery or HTTP here.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from app.options import TranscribeOptions

if TYPE_CHECKING:
    from whisper.model import Whisper

log = logging.getLogger(__name__)

SAMPLE_RATE = 16_000
ENCODER_TOKENS_PER_SECOND = 50  # one encoder position per 20 ms of audio


class EngineInputError(ValueError):
    """The job cannot run as asked (e.g. an option the model cannot honour)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class EngineJob:
    audio: np.ndarray  # float32 mono, 16 kHz
    options: TranscribeOptions


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
    # What openai-whisper reports per segment (OpenAI's verbose_json carries them all).
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


def _segment(i: int, s: dict[str, Any]) -> Segment:
    words = s.get("words")
    return Segment(
        id=i,
        start=round(float(s["start"]), 3),
        end=round(float(s["end"]), 3),
        text=str(s["text"]),
        seek=int(s["seek"]),
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
    runtime_ms: int  # model time spent on this job (its share, once jobs are batched)
    tokens_generated: int  # decoder output tokens kept in the transcript (text + timestamps)
    tokens_input: int  # encoder positions the audio occupies (20 ms each)
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


_STOP = object()


class Engine:
    def __init__(self, model: Whisper) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.fp16 = self.device.type == "cuda"
        self._inbox: queue.Queue[Any] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="whisperq-engine", daemon=True)
        self._thread.start()

    def submit(self, job: EngineJob) -> Future[EngineResult]:
        fut: Future[EngineResult] = Future()
        self._inbox.put((job, fut))
        return fut

    def close(self, timeout: float | None = None) -> None:
        self._inbox.put(_STOP)
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            item = self._inbox.get()
            if item is _STOP:
                return
            job, fut = item
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(self.transcribe(job))
            except BaseException as exc:  # handed to the waiting task, never lost here
                fut.set_exception(exc)

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
        import whisper

        opts = job.options
        self._check(opts)
        audio = torch.from_numpy(np.ascontiguousarray(job.audio, dtype=np.float32))
        start = time.perf_counter()
        with torch.inference_mode():
            out = whisper.transcribe(self.model, audio, **opts.transcribe_kwargs(fp16=self.fp16))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        runtime_ms = max(1, round((time.perf_counter() - start) * 1000))
        segments = tuple(_segment(i, s) for i, s in enumerate(out["segments"]))
        return EngineResult(
            text=str(out["text"]).strip(),
            segments=segments,
            language=str(out["language"]),
            runtime_ms=runtime_ms,
            tokens_generated=sum(len(s["tokens"]) for s in out["segments"]),
            tokens_input=math.ceil(len(job.audio) / SAMPLE_RATE * ENCODER_TOKENS_PER_SECOND),
            raw=out,
        )
