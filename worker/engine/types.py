"""What goes into the engine and what comes out: the job, its result, the errors it raises.

No torch here: these are the types the worker's tasks (:mod:`worker.tasks`) see.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from app.jobs.options import TranscribeOptions

SAMPLE_RATE = 16_000
ENCODER_TOKENS_PER_SECOND = 50  # one encoder position per 20 ms of audio
N_FRAMES = 3000  # mel frames of a 30 s window (whisper.audio.N_FRAMES)
HOP_LENGTH = 160  # audio samples per mel frame (whisper.audio.HOP_LENGTH)
FRAMES_PER_SECOND = SAMPLE_RATE // HOP_LENGTH  # mel frames (whisper.audio.FRAMES_PER_SECOND)


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
        """One of ``transcribe()``'s segment dicts (or the batched path's, which are the same)."""
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
    # transcribe()'s own dict: text, segments (dicts), language
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class Decoded:
    """One window's decode at one temperature: the fields of whisper's ``DecodingResult``
    that ``transcribe()`` reads."""

    tokens: list[int]
    text: str
    avg_logprob: float
    no_speech_prob: float
    temperature: float
    compression_ratio: float


def result_of(raw: dict[str, Any], n_samples: int, runtime_s: float) -> EngineResult:
    """The job's result from ``transcribe()``'s dict (or the batched path's equal one)."""
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
