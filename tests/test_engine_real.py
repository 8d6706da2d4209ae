"""The engine on real weights: parity with sequential ``whisper.transcribe()`` (tiny.en), and
language detection and translation on a multilingual model (base, same tokenizer as tiny)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import whisper

from app.options import parse_options
from tests.support.api import normalise, wer
from tests.support.real_models import base_multilingual_checkpoint, speak, tiny_en_checkpoint
from worker.audio import decode
from worker.engine import Engine, EngineJob

pytestmark = pytest.mark.slow

ENGLISH = (
    "Good morning everyone. Today we will talk about the new product and the plans for "
    "next year. Please ask questions at the end."
)
GERMAN = "Guten Morgen. Das Wetter ist heute sehr schön. Ich trinke gerne Kaffee."


def audio_of(text: str, path: Path, voice: str = "en-us") -> np.ndarray:
    return decode(speak(text, path, voice=voice), timeout_s=60)


@pytest.fixture(scope="module")
def tiny_en() -> Iterator[Engine]:
    engine = Engine(whisper.load_model(str(tiny_en_checkpoint()), device="cpu"))
    yield engine
    engine.close(5)


@pytest.fixture(scope="module")
def base() -> Iterator[Engine]:
    engine = Engine(whisper.load_model(str(base_multilingual_checkpoint()), device="cpu"))
    yield engine
    engine.close(5)


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"patience": "1.0"},
        {"initial_prompt": "Product planning meeting.", "condition_on_previous_text": "false"},
    ],
)
def test_matches_sequential_transcribe(
    tiny_en: Engine, tmp_path: Path, fields: dict[str, str]
) -> None:
    audio = audio_of(ENGLISH, tmp_path / "en.wav")
    options = parse_options(fields)
    ours = tiny_en.submit(EngineJob(audio=audio, options=options)).result(timeout=300)
    reference = whisper.transcribe(tiny_en.model, audio, **options.transcribe_kwargs(fp16=False))
    assert ours.text == reference["text"].strip()
    assert [s.text for s in ours.segments] == [s["text"] for s in reference["segments"]]
    assert [(s.start, s.end) for s in ours.segments] == [
        (round(s["start"], 3), round(s["end"], 3)) for s in reference["segments"]
    ]
    assert wer(ENGLISH, ours.text) < 0.15


def test_detects_german_and_translates_it(base: Engine, tmp_path: Path) -> None:
    audio = audio_of(GERMAN, tmp_path / "de.wav", voice="de")
    heard = base.submit(EngineJob(audio=audio, options=parse_options({}))).result(timeout=300)
    assert heard.language == "de"
    assert {"guten", "morgen", "kaffee"} <= set(normalise(heard.text).split())
    translated = base.submit(
        EngineJob(audio=audio, options=parse_options({"task": "translate"}))
    ).result(timeout=300)
    assert translated.language == "de"
    words = set(normalise(translated.text).split())
    assert {"morning", "weather", "coffee"} <= words, translated.text
    assert not {"guten", "kaffee"} & words


def test_forced_language_overrides_detection(base: Engine, tmp_path: Path) -> None:
    audio = audio_of(GERMAN, tmp_path / "de.wav", voice="de")
    forced = base.submit(EngineJob(audio=audio, options=parse_options({"language": "en"}))).result(
        timeout=300
    )
    assert forced.language == "en"
