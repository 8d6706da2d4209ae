"""The GPU benches' corpus: ``../shared/gpu/pack.sh``'s 16 kHz int16 ``.npy`` clips (three
espeak-ng sentences) and long-form files joined from them (30-50 s: several windows, prompts
from earlier ones), with their texts and a word error rate. No torch here: the worker-path
bench sets up its services before anything loads a model."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16_000
# pack.sh's espeak-ng texts, keyed by the file it writes.
TEXTS = {
    "espeak0": "Good morning everyone. Today we will talk about the new product and the plans "
    "for next year. Please ask questions at the end.",
    "espeak1": "The quarterly report shows that sales grew in every region except the north, "
    "where the weather delayed two of our largest shipments.",
    "espeak2": "Please remember to lock the doors and switch off the lights when you leave the "
    "office this evening.",
}
LONG_FORMS = (("espeak0", "espeak1", "espeak2"), ("espeak2", "espeak0", "espeak1", "espeak0"))


@dataclass(frozen=True)
class Clip:
    name: str
    text: str
    audio: np.ndarray

    @property
    def seconds(self) -> float:
        return len(self.audio) / SAMPLE_RATE


def words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split()


def corpus_wer(refs: Sequence[str], hyps: Sequence[str]) -> float:
    errors = total = 0
    for ref, hyp in zip(refs, hyps, strict=True):
        r, h = words(ref), words(hyp)
        prev = list(range(len(h) + 1))
        for i, rw in enumerate(r, 1):
            cur = [i] + [0] * len(h)
            for j, hw in enumerate(h, 1):
                cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (rw != hw))
            prev = cur
        errors += prev[-1]
        total += len(r)
    return errors / max(total, 1)


def load_corpus(audio_dir: Path) -> list[Clip]:
    base = {p.stem: np.load(p).astype(np.float32) / 32768 for p in sorted(audio_dir.glob("*.npy"))}
    missing = set(TEXTS) - set(base)
    if missing:
        raise SystemExit(f"bench: missing clips {sorted(missing)} in {audio_dir}")
    gap = np.zeros(SAMPLE_RATE // 2, np.float32)
    clips = [Clip(name, TEXTS[name], base[name]) for name in TEXTS]
    for parts in LONG_FORMS:
        audio = np.concatenate([x for p in parts for x in (base[p], gap)])
        clips.append(Clip("+".join(parts), " ".join(TEXTS[p] for p in parts), audio))
    return clips
