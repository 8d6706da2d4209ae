"""Decoding options of the hosted API: parsed and validated once, carried as plain JSON.

The API validates them (no torch there); the worker turns them into ``whisper.transcribe``
keyword arguments with :meth:`TranscribeOptions.transcribe_kwargs`.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import asdict, dataclass
from typing import Any, Literal

from app.jobs.languages import LANGUAGES

# The languages openai-whisper knows, copied so the API can validate without importing whisper.
LANGUAGE_CODES = frozenset(LANGUAGES)

# Beam width used when a caller asks for beam search by giving ``patience`` (whisper's CLI default).
BEAM_SIZE = 5
MAX_PROMPT_CHARS = 2000
# openai-whisper's transcribe() defaults: punctuation merged into the neighbouring word when
# word timestamps are on.
PREPEND_PUNCTUATIONS = "\"'“¿([{-"
APPEND_PUNCTUATIONS = "\"'.。,，!！?？:：”)]}、"
MAX_PUNCTUATION_CHARS = 64

# Bounds on the work one request can ask for (issue 14). Each decoding pass of a 30 s window
# is one rung of the temperature ladder, so the ladder's length *is* the number of passes a
# window can cost: whisper's default ladder (0, 0.2, ..., 1.0) has six rungs, and no request
# may ask for more.
MAX_TEMPERATURES = 6
# The thresholds decide how often a window falls back. The average log-probability of a decode
# is always < 0 and ordinary text gzips at a ratio of about 1.3-1.8, so thresholds at or near
# those values fail *every* window at *every* temperature. These bounds keep a threshold where
# ordinary speech passes; the ladder cap above still bounds the worst case.
LOGPROB_THRESHOLD_RANGE = (-10.0, -0.5)
COMPRESSION_RATIO_RANGE = (2.0, 10.0)
# round(BEAM_SIZE * patience) candidates per beam; whisper asserts it is > 0.
PATIENCE_RANGE = (0.5, 3.0)
MAX_SUPPRESS_TOKENS = 1000
MAX_TOKEN_ID = 1_000_000  # any vocabulary is smaller; the engine checks its own exactly
# Each of best_of samples is a full decode of the window at that temperature: it multiplies
# the cost of every sampled rung, so it is capped at whisper's CLI default.
MAX_BEST_OF = 5
# whisper's ranker raises outside [0, 1] (the alpha of Google NMT's length penalty).
LENGTH_PENALTY_RANGE = (0.0, 1.0)
# A caller's clip list is host work per window and a list of windows to decode: bounded.
MAX_CLIP_TIMESTAMPS = 200
MAX_CLIP_SECONDS = 86_400.0
# Longer than a 30 s window it could never be exceeded by a gap inside one.
HALLUCINATION_SILENCE_RANGE = (0.0, 30.0)
# Whisper's tokenizer refuses text that spells a special token (<|endoftext|>, <|en|>,
# <|0.00|>...), so such a prompt is the caller's error, said before any work.
_HUGE_LADDER = 10**9
_SPECIAL_TOKEN_RE = re.compile(r"<\|[^<>|]*\|>")


_LATER_DEFAULTS: dict[str, Any] = {
    "best_of": None,
    "length_penalty": None,
    "clip_timestamps": "0",
    "hallucination_silence_threshold": None,
    "carry_initial_prompt": False,
}


class OptionError(ValueError):
    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(message)
        self.field = field_name
        self.message = message


@dataclass(frozen=True)
class TranscribeOptions:
    task: Literal["transcribe", "translate"] = "transcribe"
    language: str | None = None
    temperature: float = 0.0
    patience: float | None = None  # None: greedy; a value: beam search of BEAM_SIZE
    suppress_tokens: str = "-1"
    initial_prompt: str | None = None
    condition_on_previous_text: bool = True
    temperature_increment_on_fallback: float | None = 0.2
    compression_ratio_threshold: float | None = 2.4
    logprob_threshold: float | None = -1.0
    no_speech_threshold: float | None = 0.6
    word_timestamps: bool = False
    prepend_punctuations: str = PREPEND_PUNCTUATIONS
    append_punctuations: str = APPEND_PUNCTUATIONS
    # Added later: defaults that are whisper's, so jobs stored before them load unchanged.
    best_of: int | None = None  # samples per window at t > 0, the best kept
    length_penalty: float | None = None  # None: rank by log-probability per token
    clip_timestamps: str = "0"  # "start,end,...", seconds; "0": the whole file
    hallucination_silence_threshold: float | None = None  # only with word_timestamps
    carry_initial_prompt: bool = False

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        # Options added after jobs were stored are left out at their defaults, so the JSON
        # (and the idempotency and batch fingerprints made of it) of a request that does not
        # use them stays what it was; from_json fills them back in.
        for name, default in _LATER_DEFAULTS.items():
            if data[name] == default:
                del data[name]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TranscribeOptions:
        return cls(**data)

    def temperatures(self) -> tuple[float, ...]:
        """The fallback ladder, as whisper's CLI builds it from temperature + increment."""
        inc = self.temperature_increment_on_fallback
        if not inc:
            return (self.temperature,)
        # Capped here too, for options stored before the bounds existed: never built up front
        # from an unchecked increment (1e-300 would be a MemoryError).
        steps = min(ladder_length(self.temperature, inc), MAX_TEMPERATURES)
        return tuple(round(self.temperature + i * inc, 6) for i in range(steps))

    def clip_seconds(self) -> list[float]:
        return [float(t) for t in self.clip_timestamps.split(",") if t.strip()]

    def suppress_token_ids(self) -> list[int]:
        return [int(t) for t in self.suppress_tokens.split(",") if t.strip()]

    def transcribe_kwargs(self, *, fp16: bool) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "task": self.task,
            "language": self.language,
            "temperature": self.temperatures(),
            "suppress_tokens": self.suppress_tokens,
            "initial_prompt": self.initial_prompt,
            "condition_on_previous_text": self.condition_on_previous_text,
            "compression_ratio_threshold": self.compression_ratio_threshold,
            "logprob_threshold": self.logprob_threshold,
            "no_speech_threshold": self.no_speech_threshold,
            "fp16": fp16,
            "verbose": None,
            "word_timestamps": self.word_timestamps,
            "prepend_punctuations": self.prepend_punctuations,
            "append_punctuations": self.append_punctuations,
            "carry_initial_prompt": self.carry_initial_prompt,
            "clip_timestamps": self.clip_timestamps,
            "hallucination_silence_threshold": self.hallucination_silence_threshold,
        }
        # Left out unless given (None is whisper's own default for both): the keyword
        # arguments of a job that does not use them stay what they were.
        if self.best_of is not None:
            kwargs["best_of"] = self.best_of
        if self.length_penalty is not None:
            kwargs["length_penalty"] = self.length_penalty
        if self.patience is not None:
            # whisper drops beam_size/patience for sampled (t > 0) fallbacks by itself.
            kwargs["beam_size"] = BEAM_SIZE
            kwargs["patience"] = self.patience
        return kwargs


def _excerpt(raw: str, limit: int = 40) -> str:
    """A caller's value echoed in an error, cut short (a 5 kB field is not worth repeating)."""
    return repr(raw if len(raw) <= limit else raw[:limit] + "...")


def ladder_length(temperature: float, increment: float | None) -> int:
    """Rungs in whisper's ladder temperature, temperature + increment, ... <= 1.0 (no tuple)."""
    if not increment:
        return 1
    span = (1.0 + 1e-6 - temperature) / increment
    if not math.isfinite(span) or span > _HUGE_LADDER:  # 5e-324 divides to infinity
        return _HUGE_LADDER
    return max(math.floor(span) + 1, 1)


def _float(
    name: str,
    raw: str | None,
    default: float | None,
    *,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    nullable: bool = False,
) -> float | None:
    if raw is None or raw.strip() == "":
        return default
    text = raw.strip().lower()
    if nullable and text in {"none", "null"}:
        return None
    try:
        value = float(text)
    except ValueError:
        raise OptionError(name, f"{name} must be a number, got {_excerpt(raw)}") from None
    if not math.isfinite(value):
        raise OptionError(name, f"{name} must be finite")
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise OptionError(name, f"{name} must be {'>' if lo_open else '>='} {lo}, got {value}")
    if hi is not None and value > hi:
        raise OptionError(name, f"{name} must be <= {hi}, got {value}")
    return value


def _bool(name: str, raw: str | None, default: bool) -> bool:
    if raw is None or raw.strip() == "":
        return default
    text = raw.strip().lower()
    if text in {"true", "1", "yes", "on"}:
        return True
    if text in {"false", "0", "no", "off"}:
        return False
    raise OptionError(name, f"{name} must be true or false, got {_excerpt(raw)}")


def _punctuation(name: str, raw: str | None, default: str) -> str:
    if raw is None:
        return default
    if len(raw) > MAX_PUNCTUATION_CHARS:
        raise OptionError(name, f"{name} longer than {MAX_PUNCTUATION_CHARS} chars")
    return raw


def _int(name: str, raw: str | None, *, lo: int, hi: int) -> int | None:
    if raw is None or raw.strip() == "":
        return None
    try:
        value = int(raw.strip())
    except ValueError:
        raise OptionError(name, f"{name} must be a whole number, got {_excerpt(raw)}") from None
    if not lo <= value <= hi:
        raise OptionError(name, f"{name} must be between {lo} and {hi}, got {value}")
    return value


def parse_clip_timestamps(raw: str | list[float] | None) -> str:
    """whisper's clip_timestamps ("start,end,start,end,..." seconds, or a list; a last start
    without an end runs to the end of the file), checked and kept as whisper's string."""
    name = "clip_timestamps"
    if raw is None:
        return "0"
    if isinstance(raw, str):
        text = raw.strip().removeprefix("[").removesuffix("]")
        parts = [p.strip() for p in text.split(",")] if text.strip() else []
        try:
            values = [float(p) for p in parts]
        except ValueError:
            raise OptionError(
                name,
                f"{name} must be comma-separated seconds start,end,..., got {_excerpt(raw)}",
            ) from None
    else:
        values = [float(v) for v in raw]
    if len(values) > MAX_CLIP_TIMESTAMPS:
        raise OptionError(name, f"{name}: at most {MAX_CLIP_TIMESTAMPS} timestamps")
    if any(not math.isfinite(v) or v < 0 or v > MAX_CLIP_SECONDS for v in values):
        raise OptionError(
            name, f"{name}: timestamps must be seconds from 0 to {MAX_CLIP_SECONDS:g}"
        )
    # whisper walks the clips in the order given and seeks forward only: overlapping or
    # backward clips would decode the same audio again, and an empty clip nothing.
    for i, (before, after) in enumerate(itertools.pairwise(values)):
        if after < before or (i % 2 == 0 and after == before):
            raise OptionError(
                name,
                f"{name} must increase: each clip's end after its start, and each start at or "
                f"after the previous clip's end (got {before:g} then {after:g})",
            )
    if values in ([], [0.0]):
        return "0"
    return ",".join(repr(v) for v in values)


def parse_suppress_tokens(raw: str | None) -> str:
    if raw is None or raw.strip() == "":
        return "-1"
    parts = [p.strip() for p in raw.split(",")]
    try:
        ids = [int(p) for p in parts]
    except ValueError:
        raise OptionError(
            "suppress_tokens",
            f"suppress_tokens must be a comma-separated list of token ids, got {_excerpt(raw)}",
        ) from None
    if len(ids) > MAX_SUPPRESS_TOKENS:
        raise OptionError("suppress_tokens", f"at most {MAX_SUPPRESS_TOKENS} token ids")
    if any(i < -1 or i > MAX_TOKEN_ID for i in ids):
        raise OptionError(
            "suppress_tokens", "token ids must be vocabulary ids >= -1 (-1: non-speech symbols)"
        )
    return ",".join(str(i) for i in ids)


def parse_options(form: dict[str, str | None]) -> TranscribeOptions:
    """Validate the hosted API's form fields; raise :class:`OptionError` naming the field.

    Fields are checked one after another and the first invalid one is the one reported, so
    the order of the steps below is part of the contract."""
    task = _parse_task(form)
    language = _parse_language(form)
    prompt = _parse_initial_prompt(form)
    temperature, increment = _parse_temperature_ladder(form)
    patience = _float(
        "patience", form.get("patience"), None, lo=PATIENCE_RANGE[0], hi=PATIENCE_RANGE[1]
    )
    word_timestamps = _bool("word_timestamps", form.get("word_timestamps"), False)
    best_of = _parse_best_of(form, temperature, increment)
    length_penalty = _parse_length_penalty(form, patience, best_of)
    silence = _parse_silence_threshold(form, word_timestamps)
    carry = _bool("carry_initial_prompt", form.get("carry_initial_prompt"), False)
    if carry and prompt is None:
        raise OptionError("carry_initial_prompt", "carry_initial_prompt needs an initial_prompt")
    suppress_tokens = parse_suppress_tokens(form.get("suppress_tokens"))
    condition = _bool("condition_on_previous_text", form.get("condition_on_previous_text"), True)
    compression_ratio, logprob, no_speech = _parse_fallback_thresholds(form)
    prepend = _punctuation(
        "prepend_punctuations", form.get("prepend_punctuations"), PREPEND_PUNCTUATIONS
    )
    append = _punctuation(
        "append_punctuations", form.get("append_punctuations"), APPEND_PUNCTUATIONS
    )
    clip_timestamps = parse_clip_timestamps(form.get("clip_timestamps"))
    return TranscribeOptions(
        task=task,  # type: ignore[arg-type]
        language=language,
        temperature=temperature,
        patience=patience,
        suppress_tokens=suppress_tokens,
        initial_prompt=prompt,
        condition_on_previous_text=condition,
        temperature_increment_on_fallback=increment,
        compression_ratio_threshold=compression_ratio,
        logprob_threshold=logprob,
        no_speech_threshold=no_speech,
        word_timestamps=word_timestamps,
        prepend_punctuations=prepend,
        append_punctuations=append,
        best_of=best_of,
        length_penalty=length_penalty,
        clip_timestamps=clip_timestamps,
        hallucination_silence_threshold=silence,
        carry_initial_prompt=carry,
    )


def _parse_task(form: dict[str, str | None]) -> str:
    task = (form.get("task") or "transcribe").strip().lower()
    if task not in ("transcribe", "translate"):
        raise OptionError("task", f"task must be 'transcribe' or 'translate', got {_excerpt(task)}")
    return task


def _parse_language(form: dict[str, str | None]) -> str | None:
    language = (form.get("language") or "").strip().lower() or None
    if language is not None and language not in LANGUAGE_CODES:
        raise OptionError("language", f"unknown language code {_excerpt(language)}")
    return language


def _parse_initial_prompt(form: dict[str, str | None]) -> str | None:
    prompt = form.get("initial_prompt") or None
    if prompt is not None and len(prompt) > MAX_PROMPT_CHARS:
        raise OptionError("initial_prompt", f"initial_prompt longer than {MAX_PROMPT_CHARS} chars")
    if prompt is not None and _SPECIAL_TOKEN_RE.search(prompt):
        raise OptionError(
            "initial_prompt",
            "initial_prompt must not contain special tokens such as <|endoftext|>",
        )
    return prompt


def _parse_temperature_ladder(form: dict[str, str | None]) -> tuple[float, float | None]:
    """temperature and temperature_increment_on_fallback, the ladder they make bounded."""
    temperature = _float("temperature", form.get("temperature"), 0.0, lo=0.0, hi=1.0)
    assert temperature is not None
    increment = _float(
        "temperature_increment_on_fallback",
        form.get("temperature_increment_on_fallback"),
        0.2,
        lo=0.0,
        hi=1.0,
        nullable=True,
    )
    rungs = ladder_length(temperature, increment)
    if rungs > MAX_TEMPERATURES:
        raise OptionError(
            "temperature_increment_on_fallback",
            f"the fallback ladder from temperature {temperature:g} to 1.0 would have "
            f"{rungs if rungs < _HUGE_LADDER else 'over a billion'} temperatures; "
            f"at most {MAX_TEMPERATURES} are allowed "
            f"(increment >= {(1.0 - temperature) / (MAX_TEMPERATURES - 1):.3g}, or 0 for none)",
        )
    return temperature, increment


def _parse_best_of(
    form: dict[str, str | None], temperature: float, increment: float | None
) -> int | None:
    best_of = _int("best_of", form.get("best_of"), lo=1, hi=MAX_BEST_OF)
    if best_of is not None and temperature == 0 and not increment:
        # whisper drops best_of at t = 0 (greedy or beam search): without a rung above 0 it
        # would be silently ignored
        raise OptionError(
            "best_of",
            "best_of is the number of samples at temperature > 0: give a temperature > 0 or "
            "keep the fallbacks (temperature_increment_on_fallback)",
        )
    return best_of


def _parse_length_penalty(
    form: dict[str, str | None], patience: float | None, best_of: int | None
) -> float | None:
    length_penalty = _float(
        "length_penalty",
        form.get("length_penalty"),
        None,
        lo=LENGTH_PENALTY_RANGE[0],
        hi=LENGTH_PENALTY_RANGE[1],
        nullable=True,
    )
    if length_penalty is not None and patience is None and (best_of or 1) < 2:
        raise OptionError(
            "length_penalty",
            "length_penalty ranks several candidates: it needs beam search (patience) or "
            "best_of >= 2",
        )
    return length_penalty


def _parse_silence_threshold(form: dict[str, str | None], word_timestamps: bool) -> float | None:
    silence = _float(
        "hallucination_silence_threshold",
        form.get("hallucination_silence_threshold"),
        None,
        lo=HALLUCINATION_SILENCE_RANGE[0],
        hi=HALLUCINATION_SILENCE_RANGE[1],
        lo_open=True,
        nullable=True,
    )
    if silence is not None and not word_timestamps:
        raise OptionError(
            "hallucination_silence_threshold",
            "hallucination_silence_threshold works on word timestamps: it needs "
            "word_timestamps=true",
        )
    return silence


def _parse_fallback_thresholds(
    form: dict[str, str | None],
) -> tuple[float | None, float | None, float | None]:
    """compression_ratio_threshold, logprob_threshold, no_speech_threshold, in that order."""
    compression_ratio = _float(
        "compression_ratio_threshold",
        form.get("compression_ratio_threshold"),
        2.4,
        lo=COMPRESSION_RATIO_RANGE[0],
        hi=COMPRESSION_RATIO_RANGE[1],
        nullable=True,
    )
    logprob = _float(
        "logprob_threshold",
        form.get("logprob_threshold"),
        -1.0,
        lo=LOGPROB_THRESHOLD_RANGE[0],
        hi=LOGPROB_THRESHOLD_RANGE[1],
        nullable=True,
    )
    no_speech = _float(
        "no_speech_threshold",
        form.get("no_speech_threshold"),
        0.6,
        lo=0.0,
        hi=1.0,
        nullable=True,
    )
    return compression_ratio, logprob, no_speech
