"""whisper.transcribe()'s options beyond the first set: best_of, length_penalty,
clip_timestamps, hallucination_silence_threshold and carry_initial_prompt. The API validates
them (a 422 naming the field), the job stores them, and the engine's result equals
``whisper.transcribe()`` given the same options on real tiny.en weights (CPU, fp32).

Each parity test also checks that its option changes whisper's own result on that audio: the
test would fail if the option were lost on the way to the engine. The references are built
from whisper's keyword arguments written out here, not from the options' own mapping, so a
mapping that drops an option cannot drop it from both sides.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from app.jobs.options import (
    MAX_CLIP_TIMESTAMPS,
    OptionError,
    TranscribeOptions,
    parse_options,
)
from tests.support.real_models import ENGLISH, LONG_ENGLISH, SHORT
from worker.engine import Engine, EngineJob, EngineResult, Segment, batched, clips_within

# A prompt without capitals or punctuation: the model copies its style into the windows
# that see it, which makes carrying it to later windows visible.
PLAIN_PROMPT = "good morning everyone today we will talk about the new product and the plans"


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"best_of": "0"}, "best_of"),
        ({"best_of": "6"}, "best_of"),
        ({"best_of": "two"}, "best_of"),
        ({"best_of": "2.5"}, "best_of"),
        # t = 0 without fallbacks: whisper would ignore best_of
        ({"best_of": "3", "temperature_increment_on_fallback": "none"}, "best_of"),
        ({"best_of": "3", "temperature_increment_on_fallback": "0"}, "best_of"),
        ({"length_penalty": "-0.1", "patience": "1"}, "length_penalty"),
        ({"length_penalty": "1.5", "patience": "1"}, "length_penalty"),
        ({"length_penalty": "nan", "patience": "1"}, "length_penalty"),
        ({"length_penalty": "short", "patience": "1"}, "length_penalty"),
        ({"length_penalty": "0.5"}, "length_penalty"),  # greedy: one candidate, no ranking
        ({"length_penalty": "0.5", "best_of": "1"}, "length_penalty"),
        ({"clip_timestamps": "a,b"}, "clip_timestamps"),
        ({"clip_timestamps": "-1,2"}, "clip_timestamps"),
        ({"clip_timestamps": "1,inf"}, "clip_timestamps"),
        ({"clip_timestamps": "5,2"}, "clip_timestamps"),
        ({"clip_timestamps": "1,1"}, "clip_timestamps"),
        ({"clip_timestamps": "1,3,2,4"}, "clip_timestamps"),
        ({"clip_timestamps": "1e9"}, "clip_timestamps"),
        (
            {"clip_timestamps": ",".join(map(str, range(MAX_CLIP_TIMESTAMPS + 1)))},
            "clip_timestamps",
        ),
        ({"hallucination_silence_threshold": "2"}, "hallucination_silence_threshold"),
        (
            {"hallucination_silence_threshold": "0", "word_timestamps": "true"},
            "hallucination_silence_threshold",
        ),
        (
            {"hallucination_silence_threshold": "-1", "word_timestamps": "true"},
            "hallucination_silence_threshold",
        ),
        (
            {"hallucination_silence_threshold": "31", "word_timestamps": "true"},
            "hallucination_silence_threshold",
        ),
        (
            {"hallucination_silence_threshold": "long", "word_timestamps": "true"},
            "hallucination_silence_threshold",
        ),
        ({"carry_initial_prompt": "maybe", "initial_prompt": "x"}, "carry_initial_prompt"),
        ({"carry_initial_prompt": "true"}, "carry_initial_prompt"),  # nothing to carry
    ],
)
def test_bad_values_name_their_field(fields: dict[str, str | None], field: str) -> None:
    with pytest.raises(OptionError) as err:
        parse_options(fields)
    assert err.value.field == field
    assert field in err.value.message or field.split("_")[0] in err.value.message


def test_accepted_values_are_stored_and_passed_to_whisper() -> None:
    opts = parse_options(
        {
            "temperature": "0.2",
            "best_of": "3",
            "patience": "1",
            "length_penalty": "0.6",
            "clip_timestamps": " [1.5, 3, 10] ",
            "word_timestamps": "true",
            "hallucination_silence_threshold": "2",
            "initial_prompt": "Glossary",
            "carry_initial_prompt": "true",
        }
    )
    assert (opts.best_of, opts.length_penalty, opts.clip_timestamps) == (3, 0.6, "1.5,3.0,10.0")
    assert (opts.hallucination_silence_threshold, opts.carry_initial_prompt) == (2.0, True)
    assert opts.clip_seconds() == [1.5, 3.0, 10.0]
    kw = opts.transcribe_kwargs(fp16=False)
    assert (kw["best_of"], kw["length_penalty"], kw["clip_timestamps"]) == (3, 0.6, "1.5,3.0,10.0")
    assert kw["hallucination_silence_threshold"] == 2.0 and kw["carry_initial_prompt"] is True
    assert TranscribeOptions.from_json(opts.to_json()) == opts
    # a list works as whisper's does; a lone 0 or nothing is the whole file
    assert parse_options({"clip_timestamps": "0"}).clip_timestamps == "0"
    assert parse_options({"clip_timestamps": ""}).clip_timestamps == "0"
    assert parse_options({"clip_timestamps": "2"}).clip_timestamps == "2.0"
    assert parse_options({"best_of": "2", "temperature": "0.5"}).best_of == 2
    assert parse_options({"length_penalty": "none"}).length_penalty is None


def test_defaults_are_whispers_and_old_stored_jobs_load() -> None:
    opts = parse_options({})
    kw = opts.transcribe_kwargs(fp16=False)
    assert "best_of" not in kw and "length_penalty" not in kw
    assert kw["clip_timestamps"] == "0" and kw["carry_initial_prompt"] is False
    assert kw["hallucination_silence_threshold"] is None
    # the stored JSON of a job that uses none of them is what it was before they existed
    # (idempotency and batch fingerprints are made of it)
    stored_before = {
        f.name: getattr(opts, f.name)
        for f in dataclasses.fields(TranscribeOptions)
        if f.name
        not in {
            "best_of",
            "length_penalty",
            "clip_timestamps",
            "hallucination_silence_threshold",
            "carry_initial_prompt",
        }
    }
    assert opts.to_json() == stored_before
    assert TranscribeOptions.from_json(stored_before) == opts


def test_only_what_the_batch_does_exactly_is_batched() -> None:
    assert batched(parse_options({"patience": "1", "length_penalty": "0"}))
    assert batched(parse_options({"initial_prompt": "x", "carry_initial_prompt": "true"}))
    assert batched(parse_options({"best_of": "1"}))  # one sample: the greedy pass's own
    assert not batched(parse_options({"best_of": "2"}))
    assert not batched(parse_options({"best_of": "2", "temperature": "0.5"}))
    assert batched(parse_options({"clip_timestamps": "1,2"}))
    # word timestamps are batched (tests/test_engine_words.py), and the threshold on them
    assert batched(parse_options({"word_timestamps": "true"}))
    words_and_threshold = {"word_timestamps": "true", "hallucination_silence_threshold": "2"}
    assert batched(parse_options(words_and_threshold))
    assert batched(parse_options({"word_timestamps": "true", "clip_timestamps": "1,2"}))
    sampled = {"temperature": "0.5", "temperature_increment_on_fallback": "none"}
    assert not batched(parse_options({**sampled, "best_of": "2", "clip_timestamps": "1,2"}))
    # stored options that never met the API's check: transcribe() ignores the threshold
    # without word timestamps, and so does the batch
    assert batched(dataclasses.replace(TranscribeOptions(), hallucination_silence_threshold=2))


def test_clips_past_the_end_of_the_audio_are_cut_there() -> None:
    n = 16_000 * 10  # 10 s: 1,000 mel frames
    assert clips_within([0.0], n) == [0.0]
    assert clips_within([1.5, 3.0, 9.0], n) == [1.5, 3.0, 9.0]
    assert clips_within([1.5, 3.0, 10.0], n) == [1.5, 3.0]  # whisper skips that one too
    assert clips_within([1.0, 2.0, 5.0, 100.0], n) == [1.0, 2.0, 5.0, 10.0]
    assert clips_within([1.0, 2.0, 12.0, 14.0], n) == [1.0, 2.0]
    assert clips_within([12.0, 14.0], n) == [10.0, 10.0]  # nothing, not the whole file
    assert clips_within([10.0], n) == [10.0, 10.0]


API_BAD = [
    ({"best_of": "9"}, "best_of"),
    ({"best_of": "2", "temperature_increment_on_fallback": "none"}, "best_of"),
    ({"length_penalty": "0.5"}, "length_penalty"),
    ({"clip_timestamps": "4,2"}, "clip_timestamps"),
    ({"hallucination_silence_threshold": "2"}, "hallucination_silence_threshold"),
    ({"carry_initial_prompt": "true"}, "carry_initial_prompt"),
]


@pytest.mark.parametrize(("fields", "field"), API_BAD)
def test_the_api_answers_422_invalid_option(api: Any, fields: dict[str, str], field: str) -> None:
    from tests.support.api import auth, new_key

    key = new_key("new-options")
    r = api.post(
        "/v1/inference/openai/whisper-tiny",
        headers=auth(key),
        data=fields,
        files={"audio": ("a.wav", b"RIFF0000WAVE")},
    )
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert (error["code"], error["field"]) == ("invalid_option", field)
    assert error["message"]


# ------------------------------------------------------------------ parity on real weights


def _audio(text: str, path: Path) -> np.ndarray:
    from tests.support.real_models import speak
    from worker.audio import decode

    return decode(speak(text, path), timeout_s=60)


@pytest.fixture(scope="module")
def tiny_en() -> Iterator[Engine]:
    import whisper

    from tests.support.real_models import tiny_en_checkpoint

    engine = Engine(whisper.load_model(str(tiny_en_checkpoint()), device="cpu"), max_wait_ms=50)
    yield engine
    engine.close(5)


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    d = tmp_path_factory.mktemp("speech")
    long = _audio(LONG_ENGLISH, d / "long.wav")
    english = _audio(ENGLISH, d / "en.wav")
    return {
        "english": english,
        "short": _audio(SHORT, d / "short.wav"),
        "long": long,
        # a second window with speech of its own: what a carried prompt changes
        "long_then_english": np.concatenate([long, english]),
    }


def _whisper(engine: Engine, audio: np.ndarray, seed: int | None = None, **kw: Any) -> Any:
    import whisper

    if seed is not None:
        torch.manual_seed(seed)
    with torch.inference_mode():
        return whisper.transcribe(
            engine.model, torch.from_numpy(audio), fp16=False, verbose=None, **kw
        )


def _engine(
    engine: Engine, audio: np.ndarray, opts: TranscribeOptions, seed: int | None = None
) -> EngineResult:
    if seed is not None:
        torch.manual_seed(seed)
    return engine.submit(EngineJob(audio, opts)).result(timeout=600)


def _key(segments: Any) -> list[tuple[Any, ...]]:
    return [(s.seek, s.start, s.end, s.text, s.tokens, s.temperature) for s in segments]


def _ref_segments(raw: dict[str, Any]) -> tuple[Segment, ...]:
    return tuple(Segment.from_whisper(s) for s in raw["segments"])


def _same(got: EngineResult, ref: dict[str, Any], *, whole: bool = False) -> None:
    assert got.text == str(ref["text"]).strip()
    if whole:  # whisper's own transcribe() ran: every field, words included
        assert got.segments == _ref_segments(ref)
    else:  # the batched decoder: equal up to float rounding of the log-probabilities
        assert _key(got.segments) == _key(_ref_segments(ref))


def _differ(a: dict[str, Any], b: dict[str, Any]) -> None:
    """The option matters on this audio: without it, whisper's result is another."""
    assert (a["text"], _key(_ref_segments(a))) != (b["text"], _key(_ref_segments(b)))


@pytest.mark.slow
def test_length_penalty_ranks_beams_batched(tiny_en: Engine, clips: dict[str, np.ndarray]) -> None:
    audio = clips["english"]
    exact_before = tiny_en.stats.exact_jobs
    got = _engine(tiny_en, audio, parse_options({"patience": "1", "length_penalty": "0"}))
    assert tiny_en.stats.exact_jobs == exact_before  # batched beam search
    ref = _whisper(tiny_en, audio, beam_size=5, patience=1.0, length_penalty=0.0)
    _same(got, ref)
    _differ(ref, _whisper(tiny_en, audio, beam_size=5, patience=1.0))


@pytest.mark.slow
def test_carry_initial_prompt_batched(tiny_en: Engine, clips: dict[str, np.ndarray]) -> None:
    audio = clips["long_then_english"]
    fields = {"initial_prompt": PLAIN_PROMPT, "condition_on_previous_text": "false"}
    exact_before = tiny_en.stats.exact_jobs
    got = _engine(tiny_en, audio, parse_options({**fields, "carry_initial_prompt": "true"}))
    assert tiny_en.stats.exact_jobs == exact_before
    kw: dict[str, Any] = {"initial_prompt": PLAIN_PROMPT, "condition_on_previous_text": False}
    ref = _whisper(tiny_en, audio, carry_initial_prompt=True, **kw)
    _same(got, ref)
    assert len({s.seek for s in got.segments}) >= 2  # the prompt was carried to a window
    _differ(ref, _whisper(tiny_en, audio, **kw))


@pytest.mark.slow
def test_best_of_samples_seeded_like_whisper(tiny_en: Engine, clips: dict[str, np.ndarray]) -> None:
    """Sampling at t = 0.5 (no fallbacks): each window is 3 samples, the best kept. Both
    sides draw from torch's seeded generator in whisper's order (the job runs whisper's own
    decoder: best_of > 1 at t > 0 takes the exact path)."""
    audio = clips["short"]
    opts = parse_options(
        {"temperature": "0.5", "temperature_increment_on_fallback": "none", "best_of": "3"}
    )
    exact_before = tiny_en.stats.exact_jobs
    got = _engine(tiny_en, audio, opts, seed=1234)
    assert tiny_en.stats.exact_jobs == exact_before + 1
    ref = _whisper(tiny_en, audio, seed=1234, temperature=0.5, best_of=3)
    _same(got, ref, whole=True)
    assert {s.temperature for s in got.segments} == {0.5}
    _differ(ref, _whisper(tiny_en, audio, seed=1234, temperature=0.5))


@pytest.mark.slow
def test_best_of_on_fallbacks_seeded_like_whisper(
    tiny_en: Engine, clips: dict[str, np.ndarray]
) -> None:
    """best_of on the ladder's rungs above 0 (every window forced down the ladder)."""
    audio = clips["short"]
    opts = dataclasses.replace(
        parse_options({"temperature_increment_on_fallback": "0.5", "best_of": "2"}),
        logprob_threshold=0.0,  # fails every decode (the API refuses it; set directly)
    )
    got = _engine(tiny_en, audio, opts, seed=7)
    kw: dict[str, Any] = {"temperature": (0.0, 0.5, 1.0), "logprob_threshold": 0.0}
    ref = _whisper(tiny_en, audio, seed=7, best_of=2, **kw)
    _same(got, ref, whole=True)
    _differ(ref, _whisper(tiny_en, audio, seed=7, **kw))


@pytest.mark.slow
def test_clip_timestamps_batched(tiny_en: Engine, clips: dict[str, np.ndarray]) -> None:
    """Clips run in the batched windows, beside a plain job: a clip inside one window, a
    clip longer than a window then a second clip, clips with word timestamps, a clip running
    past the end of the audio and one starting after it. Each job equals whisper's
    transcribe() with the same clips (temperature 0 alone: a fallback would sample)."""
    t0: dict[str, str | None] = {"temperature": "0", "temperature_increment_on_fallback": "none"}
    english, long = clips["english"], clips["long_then_english"]
    cases: list[tuple[np.ndarray, dict[str, str | None], dict[str, Any]]] = [
        (english, {"clip_timestamps": "1.0,4.5"}, {"clip_timestamps": "1.0,4.5"}),
        (long, {"clip_timestamps": "0.5,31,33,37"}, {"clip_timestamps": "0.5,31,33,37"}),
        (
            long,
            {"clip_timestamps": "3,12,20", "word_timestamps": "true"},
            {"clip_timestamps": "3,12,20", "word_timestamps": True},
        ),
        # whisper would decode empty windows past the end for ever: to the end, as with "2"
        (english, {"clip_timestamps": "2,100"}, {"clip_timestamps": "2"}),
    ]
    exact_before = tiny_en.stats.exact_jobs
    jobs = [EngineJob(audio, parse_options({**t0, **fields})) for audio, fields, _ in cases]
    after_end = EngineJob(english, parse_options({**t0, "clip_timestamps": "50,60"}))
    plain = EngineJob(english, parse_options(t0))
    futures = [tiny_en.submit(j) for j in [*jobs, after_end, plain]]
    got = [f.result(timeout=600) for f in futures]
    assert tiny_en.stats.exact_jobs == exact_before  # nothing took the exact path
    for (audio, _, kw), ours in zip(cases, got, strict=False):
        ref = _whisper(tiny_en, audio, temperature=0.0, **kw)
        _same(ours, ref)
        if kw.get("word_timestamps"):
            words = [s.get("words") for s in ours.raw["segments"]]
            assert words == [s["words"] for s in ref["segments"]]
        _differ(ref, _whisper(tiny_en, audio, temperature=0.0))
    clipped, two_clips, with_words = got[0], got[1], got[2]
    # the model's last timestamp may overshoot the clip's end a little, as in whisper
    assert clipped.segments[0].start >= 1.0 and clipped.segments[-1].end < 5.0
    assert len({s.seek for s in two_clips.segments}) >= 3  # two windows in the first clip
    assert any(s.start >= 33.0 for s in two_clips.segments)
    assert not any(12.0 < s.start < 20.0 for s in with_words.segments)
    assert (got[4].text, got[4].segments) == ("", ())
    _same(got[5], _whisper(tiny_en, english, temperature=0.0))


@pytest.mark.slow
def test_hallucination_silence_threshold_batched(
    tiny_en: Engine, clips: dict[str, np.ndarray]
) -> None:
    """On a file longer than a window whose first decode ends inside speech, the threshold
    decides where the next window starts. The job runs in the batched windows; its words
    are whisper's bit for bit (temperature 0 alone: a fallback would sample)."""
    audio = clips["long"]
    fields: dict[str, str | None] = {
        "word_timestamps": "true",
        "hallucination_silence_threshold": "5",
        "temperature": "0",
        "temperature_increment_on_fallback": "none",
    }
    exact_before = tiny_en.stats.exact_jobs
    got = _engine(tiny_en, audio, parse_options(fields))
    assert tiny_en.stats.exact_jobs == exact_before
    kw: dict[str, Any] = {"word_timestamps": True, "temperature": 0.0}
    ref = _whisper(tiny_en, audio, hallucination_silence_threshold=5.0, **kw)
    _same(got, ref)
    assert [s.get("words") for s in got.raw["segments"]] == [s["words"] for s in ref["segments"]]
    assert all(s.words is not None for s in got.segments)
    _differ(ref, _whisper(tiny_en, audio, **kw))
