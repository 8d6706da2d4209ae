"""A small random-initialised Whisper checkpoint: real code paths, fast, no weights needed."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch
from whisper.model import ModelDimensions, Whisper

TINY_RANDOM = ModelDimensions(
    n_mels=80,
    n_audio_ctx=1500,
    n_audio_state=64,
    n_audio_head=1,
    n_audio_layer=1,
    n_vocab=51865,
    n_text_ctx=448,
    n_text_state=64,
    n_text_head=1,
    n_text_layer=1,
)


def random_model(seed: int = 0, dims: ModelDimensions = TINY_RANDOM) -> Whisper:
    torch.manual_seed(seed)
    model = Whisper(dims)
    # Larger random weights make the decoder's choices depend on the input, not on ties.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    return model.eval()


def random_checkpoint(path: Path, seed: int = 0) -> Path:
    model = random_model(seed)
    torch.save({"dims": asdict(model.dims), "model_state_dict": model.state_dict()}, path)
    return path
