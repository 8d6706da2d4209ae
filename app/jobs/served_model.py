"""What the workers serve, as the API learns it: the worker publishes its model's public
name and whether it is multilingual when it loads it; the API reads that (cached a few
seconds) to name the models it accepts and to refuse, at submission, options the model
cannot honour. The API cannot import the worker nor look at the weights, and the
configured name alone does not say it: the default ``tiny`` falls back to the English-only
``tiny.en`` on a machine with no route to the model host."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass
from functools import lru_cache

import redis

from app.errors import ErrorCode, ServiceError
from app.jobs.options import TranscribeOptions
from app.settings import Settings

log = logging.getLogger(__name__)

KEY = "whisperq:served-model"
# Submissions come many a second; the model changes only when a worker (re)starts.
CACHE_S = 5.0
# The worker's default model, and what it serves instead when that cannot be downloaded
# (worker/model_loading.py): here so that the API can accept the fallback's name too.
DEFAULT_MODEL = "tiny"
FALLBACK_NAME = "tiny.en"


@dataclass(frozen=True)
class ServedModel:
    name: str  # public: a Whisper model name or a checkpoint's file stem, never a path
    multilingual: bool
    published_at: float  # unix seconds

    def refusal(self, options: TranscribeOptions) -> ServiceError | None:
        """Why this model cannot run ``options``, as the caller's error; None when it can."""
        if self.multilingual:
            return None
        if options.task == "translate":
            field = "task"
        elif options.language not in (None, "en"):
            field = "language"
        else:
            return None
        return ServiceError.of(
            ErrorCode.unsupported_option,
            f"this server runs an English-only model ({self.name}): task=translate and "
            "languages other than 'en' are not available",
            field=field,
        )


def is_path(name_or_path: str) -> bool:
    """Whether WHISPERQ_MODEL names a checkpoint file (the worker's own test)."""
    return os.sep in name_or_path or name_or_path.endswith((".pt", ".pth"))


@lru_cache(maxsize=4)
def _client(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)


_cache_lock = threading.Lock()
_cache: dict[str, tuple[float, ServedModel | None]] = {}


def publish(served: ServedModel, *, redis_url: str) -> None:
    """Called by the worker once its model is loaded. Raises redis.RedisError."""
    _client(redis_url).set(KEY, json.dumps(asdict(served)))
    with _cache_lock:
        _cache.pop(redis_url, None)  # a process that publishes reads its own write at once


def _parse(raw: bytes | str | None) -> ServedModel | None:
    if raw is None:
        return None
    try:
        data = json.loads(raw)
        return ServedModel(
            name=str(data["name"]),
            multilingual=bool(data["multilingual"]),
            published_at=float(data["published_at"]),
        )
    except (ValueError, TypeError, KeyError):
        log.warning("ignoring a malformed %s key in Redis", KEY)
        return None


def current(redis_url: str, *, max_age_s: float = CACHE_S) -> ServedModel | None:
    """The model last published, or None when none is (or Redis cannot say): then the
    caller accepts what it accepted before there was anything to read, and the worker's
    own check stays the backstop. Blocking: call it from a worker thread."""
    now = time.monotonic()
    with _cache_lock:
        hit = _cache.get(redis_url)
    if hit is not None and now - hit[0] < max_age_s:
        return hit[1]
    try:
        served = _parse(_client(redis_url).get(KEY))
    except redis.RedisError as exc:
        log.warning("could not read the served model from Redis: %s", exc)
        served = None
    with _cache_lock:
        _cache[redis_url] = (now, served)
    return served


def public_names(settings: Settings, served: ServedModel | None) -> list[str]:
    """The model names a request may give, first the ones OpenAI clients send. A configured
    checkpoint path is never one: it would name the server's files to any caller."""
    names = list(settings.openai_model_aliases)
    if not is_path(settings.model):
        names.append(settings.model)
        if settings.model == DEFAULT_MODEL:
            names.append(FALLBACK_NAME)
    if served is not None:
        names.append(served.name)
    return list(dict.fromkeys(names))


def check_options(options: TranscribeOptions, *, settings: Settings) -> None:
    """Refuse, before any job exists, options the served model cannot honour."""
    served = current(settings.redis_url)
    err = served.refusal(options) if served is not None else None
    if err is not None:
        raise err
