"""The batched engine on real weights: every job of a mixed batch equals sequential
``whisper.transcribe()`` of it alone (tiny.en; multilingual base for language detection and
translation, batched)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import whisper

from app.jobs.options import parse_options
from tests.support.api import normalise, wer
from tests.support.real_models import (
    ENGLISH,
    LONG_ENGLISH,
    base_multilingual_checkpoint,
    speak,
    tiny_en_checkpoint,
)
from worker.audio import decode
from worker.engine import Engine, EngineJob, EngineResult

pytestmark = pytest.mark.slow

GERMAN = "Guten Morgen. Das Wetter ist heute sehr schön. Ich trinke gerne Kaffee."


def audio_of(text: str, path: Path, voice: str = "en-us") -> np.ndarray:
    return decode(speak(text, path, voice=voice), timeout_s=60)


def run_all(engine: Engine, jobs: list[EngineJob]) -> list[EngineResult]:
    """The jobs submitted together (one batch), their results in order."""
    return [f.result(timeout=600) for f in [engine.submit(j) for j in jobs]]


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> tuple[np.ndarray, np.ndarray]:
    """ENGLISH and LONG_ENGLISH spoken once for the module (the long one over 30 s)."""
    d = tmp_path_factory.mktemp("speech")
    return audio_of(ENGLISH, d / "en.wav"), audio_of(LONG_ENGLISH, d / "long.wav")


def key(result: EngineResult) -> list[tuple[Any, ...]]:
    return [(s.seek, s.start, s.end, s.text, s.tokens, s.temperature) for s in result.segments]


@pytest.fixture(scope="module")
def tiny_en() -> Iterator[Engine]:
    engine = Engine(whisper.load_model(str(tiny_en_checkpoint()), device="cpu"), max_wait_ms=200)
    yield engine
    engine.close(5)


@pytest.fixture(scope="module")
def base() -> Iterator[Engine]:
    engine = Engine(
        whisper.load_model(str(base_multilingual_checkpoint()), device="cpu"), max_wait_ms=200
    )
    yield engine
    engine.close(5)


def test_mixed_batch_matches_sequential_transcribe(
    tiny_en: Engine, speech: tuple[np.ndarray, np.ndarray]
) -> None:
    short, long = speech
    assert len(long) > 30 * 16_000
    prompt = "Product planning meeting."
    greedy: list[tuple[str, np.ndarray, dict[str, str]]] = [
        (ENGLISH, short, {}),
        (LONG_ENGLISH, long, {}),
        (ENGLISH, short, {"initial_prompt": prompt, "condition_on_previous_text": "false"}),
        (LONG_ENGLISH, long, {"condition_on_previous_text": "false"}),
        (LONG_ENGLISH, long, {"initial_prompt": prompt}),
        # beam search, batched as its own group: whisper's BeamSearchDecoder semantics
        (ENGLISH, short, {"patience": "1.0"}),
        (LONG_ENGLISH, long, {"patience": "2"}),
        (ENGLISH, short, {"patience": "0.5", "initial_prompt": prompt}),
    ]
    # logprob_threshold=0 fails every decode: the whole temperature ladder is walked (set on
    # the options directly: the API refuses thresholds that force every fallback)
    fallback = EngineJob(short, dataclasses.replace(parse_options({}), logprob_threshold=0.0))
    # a beam job's fallbacks sample (t > 0) without beams, in the greedy group, as whisper does
    beam_fallback = EngineJob(
        short, dataclasses.replace(parse_options({"patience": "1"}), logprob_threshold=0.0)
    )
    jobs = [EngineJob(audio, parse_options(fields)) for _, audio, fields in greedy]
    beam_before = tiny_en.stats.beam_jobs
    futures = [tiny_en.submit(j) for j in [*jobs, fallback, beam_fallback]]
    ours = [f.result(timeout=600) for f in futures]
    for (text, _, fields), job, got in zip(greedy, jobs, ours[:-2], strict=True):
        ref = tiny_en.transcribe(job)
        assert (got.text, key(got)) == (ref.text, key(ref)), fields
        assert wer(text, got.text) < 0.2, got.text
    assert len({s.seek for s in ours[1].segments}) >= 2  # really several windows
    assert len({s.seek for s in ours[6].segments}) >= 2  # the long file under beam search
    # beam windows: 1 + 2 (long) + 1, and the beam fallback's first rung
    assert tiny_en.stats.beam_jobs - beam_before >= 5
    assert tiny_en.stats.exact_jobs == 0  # nothing went through whisper's own decoder
    for job, got in zip((fallback, beam_fallback), ours[-2:], strict=True):
        ref = tiny_en.transcribe(job)
        assert {s.temperature for s in got.segments} == {1.0}
        assert {s.temperature for s in ref.segments} == {1.0}


def test_detects_translates_and_forces_language_in_one_batch(base: Engine, tmp_path: Path) -> None:
    german = audio_of(GERMAN, tmp_path / "de.wav", voice="de")
    english = audio_of(ENGLISH, tmp_path / "en.wav")
    jobs = [
        EngineJob(german, parse_options({})),
        EngineJob(english, parse_options({})),
        EngineJob(german, parse_options({"task": "translate"})),
        EngineJob(german, parse_options({"language": "en"})),
        EngineJob(german, parse_options({"task": "translate", "patience": "1"})),  # beams
    ]
    heard, heard_en, translated, forced, beam_translated = [
        f.result(timeout=600) for f in [base.submit(j) for j in jobs]
    ]
    outs = (heard, heard_en, translated, forced, beam_translated)
    for job, got in zip(jobs, outs, strict=True):
        ref = base.transcribe(job)
        assert (got.language, got.text, key(got)) == (ref.language, ref.text, key(ref))
    assert heard.language == "de" and heard_en.language == "en"
    assert {"guten", "morgen", "kaffee"} <= set(normalise(heard.text).split())
    assert translated.language == "de"
    words = set(normalise(translated.text).split())
    assert {"morning", "weather", "coffee"} <= words, translated.text
    assert not {"guten", "kaffee"} & words
    assert forced.language == "en"


def test_reading_the_device_every_few_steps_decodes_the_same(
    tiny_en: Engine, speech: tuple[np.ndarray, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A GPU's loop reads how many rows live every SYNC_EVERY_CUDA steps (rows that ended sit
    through the steps between): the transcripts are the very ones of a read every step, with
    rows of a batch ending at different steps, across windows and prompts."""
    from worker.engine import decoding

    short, long = speech
    jobs = [
        EngineJob(short, parse_options({})),
        EngineJob(long, parse_options({})),
        EngineJob(long, parse_options({"condition_on_previous_text": "false"})),
        EngineJob(short, dataclasses.replace(parse_options({}), logprob_threshold=0.0)),
    ]
    every_step = run_all(tiny_en, jobs)
    monkeypatch.setattr(decoding, "SYNC_EVERY_CPU", decoding.SYNC_EVERY_CUDA)
    deferred_engine = Engine(tiny_en.model, max_wait_ms=200)
    try:
        assert deferred_engine.decoder.sync_every == decoding.SYNC_EVERY_CUDA
        deferred = run_all(deferred_engine, jobs)
    finally:
        deferred_engine.close(5)
    for a, b in zip(every_step[:3], deferred[:3], strict=True):
        assert (b.text, key(b)) == (a.text, key(a))
        # Equal but for float rounding: rows leave the batch at other steps, so its matrix
        # products run at other sizes (a done row's log-probabilities counted would be off
        # by tenths).
        assert [s.avg_logprob for s in b.segments] == pytest.approx(
            [s.avg_logprob for s in a.segments], abs=1e-4
        )
        assert b.tokens_generated == a.tokens_generated
    # The fallback's sampled rungs read each step; their draws depend on the engine's
    # generator, not comparable across two engines: both walked the ladder to its end.
    assert {s.temperature for s in every_step[3].segments} == {1.0}
    assert {s.temperature for s in deferred[3].segments} == {1.0}


def test_static_steps_decode_the_same(
    tiny_en: Engine, speech: tuple[np.ndarray, np.ndarray]
) -> None:
    """The static decoder step (the shapes a CUDA graph captures: the slot on the device,
    keys and values written by index_copy_, every slot attended with the unwritten ones
    masked) gives the eager step's transcripts: greedy and beam rows, prompts, long-form."""
    short, long = speech
    jobs = [
        EngineJob(short, parse_options({})),
        EngineJob(long, parse_options({})),
        EngineJob(short, parse_options({"initial_prompt": "Product planning meeting."})),
        EngineJob(long, parse_options({"patience": "1"})),
    ]
    eager = run_all(tiny_en, jobs)
    static_engine = Engine(tiny_en.model, max_wait_ms=200, step_mode="static")
    try:
        static = run_all(static_engine, jobs)
    finally:
        static_engine.close(5)
    assert len({s.seek for s in static[1].segments}) >= 2
    for a, b in zip(eager, static, strict=True):
        assert (b.text, key(b)) == (a.text, key(a))
        # more (masked) keys in each softmax: equal up to float rounding
        assert [s.avg_logprob for s in b.segments] == pytest.approx(
            [s.avg_logprob for s in a.segments], abs=1e-4
        )
    with pytest.raises(ValueError, match="CUDA"):
        Engine(tiny_en.model, step_mode="graph")
