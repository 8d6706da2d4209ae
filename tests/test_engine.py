"""The engine behind the worker–engine seam, on a small random Whisper: every decoding option
reaches ``model.decode`` for real (observed with a pass-through recorder, not a mock)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from whisper.decoding import DecodingOptions
from whisper.tokenizer import get_tokenizer

from app.options import BEAM_SIZE, TranscribeOptions, parse_options
from tests.support.random_model import random_model
from worker.engine import Engine, EngineInputError, EngineJob

SR = 16_000


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    eng = Engine(random_model(seed=1))
    yield eng
    eng.close(5)


@pytest.fixture
def decode_calls(engine: Engine) -> Iterator[list[DecodingOptions]]:
    """Records the DecodingOptions of every real model.decode call whisper makes."""
    calls: list[DecodingOptions] = []
    original = engine.model.decode

    def recording_decode(mel: torch.Tensor, options: DecodingOptions) -> Any:
        calls.append(options)
        return original(mel, options)

    engine.model.decode = recording_decode  # type: ignore[method-assign]
    yield calls
    del engine.model.decode


def noise(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(int(seconds * SR)) * 0.1).astype(np.float32)


def run(engine: Engine, seconds: float = 5.0, **fields: str) -> Any:
    job = EngineJob(audio=noise(seconds), options=parse_options(fields))
    return engine.submit(job).result(timeout=300)


# With thresholds off, whisper decodes each 30 s window exactly once at the first temperature.
NO_FALLBACK = {
    "compression_ratio_threshold": "none",
    "logprob_threshold": "none",
    "no_speech_threshold": "none",
}


def test_result_shape_and_metering(engine: Engine) -> None:
    out = run(engine, 5.0, **NO_FALLBACK)
    assert out.runtime_ms > 0
    assert out.tokens_input == 250  # 5 s at 50 encoder positions per second
    assert out.tokens_generated == sum(len(s["tokens"]) for s in out.raw["segments"])
    assert out.text == out.raw["text"].strip()
    assert [s.id for s in out.segments] == list(range(len(out.segments)))
    assert out.language == out.raw["language"]


def test_task_and_language_reach_decoding(
    engine: Engine, decode_calls: list[DecodingOptions]
) -> None:
    out = run(engine, task="translate", language="de", **NO_FALLBACK)
    assert {(c.task, c.language) for c in decode_calls} == {("translate", "de")}
    assert out.language == "de"
    decode_calls.clear()
    out = run(engine, **NO_FALLBACK)  # no language: detected first, then decoded with it
    assert decode_calls[0].language == out.language and out.language is not None


def test_temperature_and_fallback_thresholds(
    engine: Engine, decode_calls: list[DecodingOptions]
) -> None:
    run(engine, temperature="0.3", temperature_increment_on_fallback="none", **NO_FALLBACK)
    assert [c.temperature for c in decode_calls] == [0.3]
    decode_calls.clear()
    # A random model's output fails logprob_threshold=0 every time: the whole ladder is tried.
    run(
        engine,
        logprob_threshold="0",
        compression_ratio_threshold="none",
        no_speech_threshold="none",
        temperature_increment_on_fallback="0.25",
    )
    assert [c.temperature for c in decode_calls] == [0.0, 0.25, 0.5, 0.75, 1.0]
    decode_calls.clear()
    # Compression ratio threshold alone: a tiny threshold makes every decode "too repetitive".
    run(
        engine,
        compression_ratio_threshold="0.01",
        logprob_threshold="none",
        no_speech_threshold="none",
        temperature_increment_on_fallback="0.5",
    )
    assert [c.temperature for c in decode_calls] == [0.0, 0.5, 1.0]


def test_no_speech_threshold_skips_silence(
    engine: Engine, decode_calls: list[DecodingOptions]
) -> None:
    # no_speech_prob > 0 always and avg_logprob < 0 always: every window is judged silent.
    silent = run(
        engine, no_speech_threshold="0", logprob_threshold="0", compression_ratio_threshold="none"
    )
    assert silent.segments == () and silent.text == ""
    assert len(decode_calls) == 1  # silence is not retried at higher temperatures
    kept = run(
        engine,
        no_speech_threshold="none",
        logprob_threshold="0",
        compression_ratio_threshold="none",
        temperature_increment_on_fallback="none",
    )
    assert kept.segments != ()


def test_patience_means_beam_search(engine: Engine, decode_calls: list[DecodingOptions]) -> None:
    run(engine, patience="2", **NO_FALLBACK)
    assert [(c.beam_size, c.patience) for c in decode_calls] == [(BEAM_SIZE, 2.0)]
    decode_calls.clear()
    run(engine, **NO_FALLBACK)
    assert [(c.beam_size, c.patience) for c in decode_calls] == [(None, None)]


def test_suppress_tokens_are_never_emitted(
    engine: Engine, decode_calls: list[DecodingOptions]
) -> None:
    first = run(engine, language="en", **NO_FALLBACK)
    emitted = [t for s in first.raw["segments"] for t in s["tokens"] if t < 50257]
    assert emitted, "the random model produced no text tokens to suppress"
    banned = sorted(set(emitted))[:5]
    decode_calls.clear()
    second = run(
        engine, language="en", suppress_tokens=",".join(map(str, [-1, *banned])), **NO_FALLBACK
    )
    assert decode_calls[0].suppress_tokens == ",".join(map(str, [-1, *banned]))
    again = {t for s in second.raw["segments"] for t in s["tokens"]}
    assert not again & set(banned)


def test_initial_prompt_and_condition_on_previous_text(
    engine: Engine, decode_calls: list[DecodingOptions]
) -> None:
    tokenizer = get_tokenizer(True, language="en", task="transcribe")
    prompt_tokens = tokenizer.encode(" Kaffee und Kuchen")
    # 65 s = three 30 s windows: the 2nd and 3rd are prompted with earlier text, or not.
    run(engine, 65.0, language="en", initial_prompt="Kaffee und Kuchen", **NO_FALLBACK)
    assert len(decode_calls) >= 2
    assert decode_calls[0].prompt == prompt_tokens
    assert len(decode_calls[1].prompt) > len(prompt_tokens)  # + the first window's output
    decode_calls.clear()
    run(
        engine,
        65.0,
        language="en",
        initial_prompt="Kaffee und Kuchen",
        condition_on_previous_text="false",
        **NO_FALLBACK,
    )
    assert decode_calls[0].prompt == prompt_tokens
    assert all(c.prompt == [] for c in decode_calls[1:])


def test_many_threads_share_one_engine(engine: Engine) -> None:
    """Tasks of a threads pool hand jobs in concurrently; each gets its own result."""
    results: dict[int, Any] = {}

    def task(i: int) -> None:
        job = EngineJob(
            audio=noise(3.0, seed=i),
            options=TranscribeOptions(
                compression_ratio_threshold=None, logprob_threshold=None, no_speech_threshold=None
            ),
        )
        results[i] = engine.submit(job).result(timeout=300)

    threads = [threading.Thread(target=task, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    solo = {
        i: engine.transcribe(
            EngineJob(
                audio=noise(3.0, seed=i),
                options=TranscribeOptions(
                    compression_ratio_threshold=None,
                    logprob_threshold=None,
                    no_speech_threshold=None,
                ),
            )
        )
        for i in range(4)
    }
    assert {i: r.text for i, r in results.items()} == {i: r.text for i, r in solo.items()}


def test_errors_reach_the_caller(engine: Engine) -> None:
    bad = EngineJob(audio=noise(1.0), options=parse_options({"suppress_tokens": "99999"}))
    with pytest.raises(EngineInputError) as err:
        engine.submit(bad).result(timeout=60)
    assert err.value.code == "invalid_option"
    # The engine thread survives a failed job.
    assert run(engine, 1.0, **NO_FALLBACK).runtime_ms > 0


def test_english_only_model_refuses_translate() -> None:
    from whisper.model import ModelDimensions

    from tests.support.random_model import TINY_RANDOM

    dims = ModelDimensions(**{**TINY_RANDOM.__dict__, "n_vocab": 51864})
    eng = Engine(random_model(dims=dims))
    try:
        for fields in ({"task": "translate"}, {"language": "de"}):
            with pytest.raises(EngineInputError) as err:
                eng.submit(EngineJob(audio=noise(1.0), options=parse_options(fields))).result(60)
            assert err.value.code == "unsupported_option"
    finally:
        eng.close(5)
