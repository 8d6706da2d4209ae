"""Decoding options of the hosted API: parsed and validated once, carried as plain JSON.

The API validates them (no torch there); the worker turns them into ``whisper.transcribe``
keyword arguments with :meth:`TranscribeOptions.transcribe_kwargs`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

from app.languages import LANGUAGES

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

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TranscribeOptions:
        return cls(**data)

    def temperatures(self) -> tuple[float, ...]:
        """The fallback ladder, as whisper's CLI builds it from temperature + increment."""
        inc = self.temperature_increment_on_fallback
        if not inc:
            return (self.temperature,)
        steps = math.floor((1.0 + 1e-6 - self.temperature) / inc) + 1
        return tuple(round(self.temperature + i * inc, 6) for i in range(max(steps, 1)))

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
        }
        if self.patience is not None:
            # whisper drops beam_size/patience for sampled (t > 0) fallbacks by itself.
            kwargs["beam_size"] = BEAM_SIZE
            kwargs["patience"] = self.patience
        return kwargs


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
        raise OptionError(name, f"{name} must be a number, got {raw!r}") from None
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
    raise OptionError(name, f"{name} must be true or false, got {raw!r}")


def _punctuation(name: str, raw: str | None, default: str) -> str:
    if raw is None:
        return default
    if len(raw) > MAX_PUNCTUATION_CHARS:
        raise OptionError(name, f"{name} longer than {MAX_PUNCTUATION_CHARS} chars")
    return raw


def parse_suppress_tokens(raw: str | None) -> str:
    if raw is None or raw.strip() == "":
        return "-1"
    parts = [p.strip() for p in raw.split(",")]
    try:
        ids = [int(p) for p in parts]
    except ValueError:
        raise OptionError(
            "suppress_tokens",
            f"suppress_tokens must be a comma-separated list of token ids, got {raw!r}",
        ) from None
    if any(i < -1 for i in ids) or len(ids) > 1000:
        raise OptionError("suppress_tokens", "token ids must be >= -1 (-1: non-speech symbols)")
    return ",".join(str(i) for i in ids)


def parse_options(form: dict[str, str | None]) -> TranscribeOptions:
    """Validate the hosted API's form fields; raise :class:`OptionError` naming the field."""
    task = (form.get("task") or "transcribe").strip().lower()
    if task not in ("transcribe", "translate"):
        raise OptionError("task", f"task must be 'transcribe' or 'translate', got {task!r}")
    language = (form.get("language") or "").strip().lower() or None
    if language is not None and language not in LANGUAGE_CODES:
        raise OptionError("language", f"unknown language code {language!r}")
    prompt = form.get("initial_prompt") or None
    if prompt is not None and len(prompt) > MAX_PROMPT_CHARS:
        raise OptionError("initial_prompt", f"initial_prompt longer than {MAX_PROMPT_CHARS} chars")
    temperature = _float("temperature", form.get("temperature"), 0.0, lo=0.0, hi=1.0)
    assert temperature is not None
    return TranscribeOptions(
        task=task,  # type: ignore[arg-type]
        language=language,
        temperature=temperature,
        patience=_float("patience", form.get("patience"), None, lo=0.0, hi=10.0, lo_open=True),
        suppress_tokens=parse_suppress_tokens(form.get("suppress_tokens")),
        initial_prompt=prompt,
        condition_on_previous_text=_bool(
            "condition_on_previous_text", form.get("condition_on_previous_text"), True
        ),
        temperature_increment_on_fallback=_float(
            "temperature_increment_on_fallback",
            form.get("temperature_increment_on_fallback"),
            0.2,
            lo=0.0,
            hi=1.0,
            nullable=True,
        ),
        compression_ratio_threshold=_float(
            "compression_ratio_threshold",
            form.get("compression_ratio_threshold"),
            2.4,
            lo=0.0,
            lo_open=True,
            nullable=True,
        ),
        logprob_threshold=_float(
            "logprob_threshold", form.get("logprob_threshold"), -1.0, hi=0.0, nullable=True
        ),
        no_speech_threshold=_float(
            "no_speech_threshold",
            form.get("no_speech_threshold"),
            0.6,
            lo=0.0,
            hi=1.0,
            nullable=True,
        ),
        word_timestamps=_bool("word_timestamps", form.get("word_timestamps"), False),
        prepend_punctuations=_punctuation(
            "prepend_punctuations", form.get("prepend_punctuations"), PREPEND_PUNCTUATIONS
        ),
        append_punctuations=_punctuation(
            "append_punctuations", form.get("append_punctuations"), APPEND_PUNCTUATIONS
        ),
    )
