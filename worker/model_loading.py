"""Loading the Whisper model once per worker process, with errors that say how to fix them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from whisper.model import Whisper


class ModelLoadError(RuntimeError):
    pass


def pick_device(setting: str) -> str:
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(
            "WHISPERQ_DEVICE=cuda but torch sees no CUDA device "
            f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}); "
            "install a CUDA build of torch or set WHISPERQ_DEVICE=cpu"
        )
    return setting


def load_model(name_or_path: str, *, device: str, download_root: Path | None = None) -> Whisper:
    import whisper

    is_path = os.sep in name_or_path or name_or_path.endswith((".pt", ".pth"))
    if is_path and not Path(name_or_path).is_file():
        raise ModelLoadError(
            f"WHISPERQ_MODEL={name_or_path!r}: no such checkpoint file. Point it at an "
            "openai-whisper .pt file, e.g. one made by `whisperq model import-ct2 DIR OUT.pt`"
        )
    if not is_path and name_or_path not in whisper.available_models():
        raise ModelLoadError(
            f"WHISPERQ_MODEL={name_or_path!r} is neither a checkpoint path nor a Whisper model "
            f"name ({', '.join(whisper.available_models())})"
        )
    try:
        model = whisper.load_model(
            name_or_path,
            device=device,
            download_root=str(download_root) if download_root else None,
        )
    except Exception as exc:  # unpickling, checksum, network: all mean 'no model'
        if is_path:
            raise ModelLoadError(
                f"could not load checkpoint {name_or_path!r}: {exc}. Is it an openai-whisper "
                "checkpoint ({'dims', 'model_state_dict'})? A CTranslate2 / faster-whisper "
                "directory must be converted first: `whisperq model import-ct2 DIR OUT.pt`"
            ) from exc
        raise ModelLoadError(
            f"could not download or verify Whisper model {name_or_path!r}: {exc}. This machine "
            "may have no route to the model host: download the checkpoint elsewhere and set "
            "WHISPERQ_MODEL to its path (or WHISPERQ_MODEL_DOWNLOAD_ROOT to a folder that "
            f"already holds {name_or_path}.pt)"
        ) from exc
    model.eval()
    return model
