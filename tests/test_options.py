"""The hosted API's decoding fields: defaults, validation naming the field, mapping to whisper."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from app.jobs.options import (
    BEAM_SIZE,
    COMPRESSION_RATIO_RANGE,
    LOGPROB_THRESHOLD_RANGE,
    MAX_TEMPERATURES,
    PATIENCE_RANGE,
    OptionError,
    TranscribeOptions,
    parse_options,
)


def test_defaults_match_the_hosted_api() -> None:
    opts = parse_options({})
    assert opts == TranscribeOptions()
    kw = opts.transcribe_kwargs(fp16=False)
    assert kw["task"] == "transcribe" and kw["language"] is None
    assert kw["temperature"] == (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    assert kw["suppress_tokens"] == "-1"
    assert kw["condition_on_previous_text"] is True
    assert (
        kw["compression_ratio_threshold"],
        kw["logprob_threshold"],
        kw["no_speech_threshold"],
    ) == (2.4, -1.0, 0.6)
    assert "beam_size" not in kw and "patience" not in kw  # greedy unless patience is given


@pytest.mark.parametrize(
    ("temperature", "increment"),
    [(0.0, 0.2), (0.0, 0.3), (0.1, 0.25), (0.5, 0.1), (1.0, 0.2), (0.3, 0.0)],
)
def test_temperature_ladder_is_whispers_cli(temperature: float, increment: float) -> None:
    opts = parse_options(
        {"temperature": str(temperature), "temperature_increment_on_fallback": str(increment)}
    )
    expected = tuple(np.arange(temperature, 1.0 + 1e-6, increment)) if increment else (temperature,)
    assert np.allclose(opts.temperatures(), expected)
    assert len(opts.temperatures()) == len(expected)


def test_every_field_is_parsed() -> None:
    opts = parse_options(
        {
            "task": "translate",
            "language": "DE",
            "temperature": "0.4",
            "patience": "2",
            "suppress_tokens": "-1, 50, 220",
            "initial_prompt": "Glossary: Kaffee",
            "condition_on_previous_text": "false",
            "temperature_increment_on_fallback": "0.3",
            "compression_ratio_threshold": "3.0",
            "logprob_threshold": "-0.5",
            "no_speech_threshold": "0.9",
        }
    )
    kw = opts.transcribe_kwargs(fp16=True)
    assert kw["task"] == "translate" and kw["language"] == "de"
    assert kw["temperature"] == (0.4, 0.7, 1.0)
    assert (kw["beam_size"], kw["patience"]) == (BEAM_SIZE, 2.0)
    assert kw["suppress_tokens"] == "-1,50,220"
    assert opts.suppress_token_ids() == [-1, 50, 220]
    assert kw["initial_prompt"] == "Glossary: Kaffee"
    assert kw["condition_on_previous_text"] is False
    assert (
        kw["compression_ratio_threshold"],
        kw["logprob_threshold"],
        kw["no_speech_threshold"],
    ) == (3.0, -0.5, 0.9)
    assert kw["fp16"] is True
    assert TranscribeOptions.from_json(opts.to_json()) == opts


def test_thresholds_can_be_switched_off() -> None:
    opts = parse_options(
        {
            "compression_ratio_threshold": "none",
            "logprob_threshold": "null",
            "no_speech_threshold": "None",
            "temperature_increment_on_fallback": "none",
        }
    )
    kw = opts.transcribe_kwargs(fp16=False)
    assert kw["compression_ratio_threshold"] is None and kw["logprob_threshold"] is None
    assert kw["no_speech_threshold"] is None and kw["temperature"] == (0.0,)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("task", "summarize"),
        ("language", "klingon"),
        ("temperature", "-0.1"),
        ("temperature", "1.5"),
        ("temperature", "warm"),
        ("temperature", "nan"),
        ("patience", "0"),
        ("patience", "-1"),
        ("suppress_tokens", "1,two,3"),
        ("suppress_tokens", "-5"),
        ("condition_on_previous_text", "maybe"),
        ("temperature_increment_on_fallback", "-0.2"),
        ("compression_ratio_threshold", "0"),
        ("logprob_threshold", "1"),
        ("no_speech_threshold", "1.1"),
        ("initial_prompt", "x" * 5000),
    ],
)
def test_bad_values_name_their_field(field: str, value: str) -> None:
    with pytest.raises(OptionError) as err:
        parse_options({field: value})
    assert err.value.field == field
    assert err.value.message


# ---------------------------------------------------------------- issue 14: bounded work

EXTREMES = [
    ("temperature_increment_on_fallback", "5e-324"),
    ("temperature_increment_on_fallback", "1e-300"),
    ("temperature_increment_on_fallback", "1e-6"),
    ("temperature_increment_on_fallback", "0.1"),  # 11 rungs from 0
    ("patience", "1e-9"),
    ("patience", "1e308"),
    ("logprob_threshold", "0"),
    ("logprob_threshold", "-0.01"),
    ("logprob_threshold", "-1e308"),
    ("compression_ratio_threshold", "1"),
    ("compression_ratio_threshold", "0.5"),
    ("compression_ratio_threshold", "1e308"),
    ("initial_prompt", "hello <|endoftext|> world"),
    ("initial_prompt", "<|startoftranscript|><|de|>"),
    ("initial_prompt", "<|0.00|>"),
    ("suppress_tokens", "9" * 5000),
    ("suppress_tokens", "99999999999"),
    ("suppress_tokens", ",".join(["1"] * 1001)),
]


@pytest.mark.parametrize(("field", "value"), EXTREMES)
def test_extremes_are_refused_naming_the_field(field: str, value: str) -> None:
    with pytest.raises(OptionError) as err:
        parse_options({field: value})
    assert err.value.field == field
    assert len(err.value.message) < 300  # a 5 kB value is not echoed back whole


@pytest.mark.parametrize("temperature", [0.0, 0.1, 0.35, 0.9, 1.0])
@pytest.mark.parametrize("increment", ["0.2", "0.25", "0.5", "1", "0", "none"])
def test_every_accepted_ladder_is_at_most_six_rungs(temperature: float, increment: str) -> None:
    opts = parse_options(
        {"temperature": str(temperature), "temperature_increment_on_fallback": increment}
    )
    assert 1 <= len(opts.temperatures()) <= MAX_TEMPERATURES


def test_a_stored_unbounded_increment_cannot_build_a_huge_ladder() -> None:
    """Options stored before the bounds existed are capped when the worker builds them."""
    for inc in (5e-324, 1e-300, 1e-6):
        ladder = TranscribeOptions(temperature_increment_on_fallback=inc).temperatures()
        assert len(ladder) == MAX_TEMPERATURES


def test_special_tokens_as_plain_text_are_fine() -> None:
    assert (
        parse_options({"initial_prompt": "a < b | c > d, <|"}).initial_prompt == "a < b | c > d, <|"
    )


def test_worst_accepted_options_cost_at_most_six_passes_per_window() -> None:
    """The most fallback-prone options still accepted, on a real (random) model: whisper's
    own transcribe makes at most MAX_TEMPERATURES decoding passes per 30 s window."""
    import whisper

    from tests.support.random_model import random_model

    worst = parse_options(
        {
            "temperature": "0",
            "temperature_increment_on_fallback": "0.2",
            "logprob_threshold": str(LOGPROB_THRESHOLD_RANGE[1]),
            "compression_ratio_threshold": str(COMPRESSION_RATIO_RANGE[0]),
            "patience": str(PATIENCE_RANGE[1]),
            "no_speech_threshold": "none",
        }
    )
    model = random_model()
    passes: list[float] = []
    real_decode = model.decode

    def counting_decode(mel: Any, options: Any) -> Any:
        passes.append(options.temperature)
        return real_decode(mel, options)

    model.decode = counting_decode  # type: ignore[method-assign]
    audio = (np.random.default_rng(0).standard_normal(16_000) * 0.1).astype(np.float32)
    # Short passes (sample_len) keep the test quick; the number of passes is what is counted.
    whisper.transcribe(model, audio, **worst.transcribe_kwargs(fp16=False), sample_len=8)
    assert 1 <= len(passes) <= MAX_TEMPERATURES  # one window: 1 s of audio
    assert passes == sorted(passes)  # one walk up the ladder, never restarted


@pytest.mark.parametrize(
    "fields", [{"task": "translate"}, {"language": "de"}, {"task": "translate", "language": "fr"}]
)
def test_english_only_model_refusal_is_the_callers_4xx(fields: dict[str, str]) -> None:
    """The issue's sync translate on an English-only model answered 500: the engine's code
    is a caller's error, so the sync answer is a 422."""
    from dataclasses import replace

    from app.api.inference import _status_code
    from app.infra.models import Job, JobStatus
    from tests.support.random_model import TINY_RANDOM, random_model
    from worker.engine import Engine, EngineInputError, EngineJob

    engine = Engine(random_model(dims=replace(TINY_RANDOM, n_vocab=51864)))  # English-only
    try:
        job = EngineJob(audio=np.zeros(16_000, np.float32), options=parse_options(fields))
        with pytest.raises(EngineInputError) as err:
            engine.submit(job).result(timeout=300)
    finally:
        engine.close(5)
    failed = Job(status=JobStatus.failed, error_code=err.value.code)
    assert _status_code(failed) == 422
