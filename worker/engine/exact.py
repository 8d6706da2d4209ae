"""The exact path: openai-whisper's own ``transcribe()``, one job at a time.

Jobs whose options the batched windows cannot reproduce exactly (clip_timestamps, best_of > 1
at t > 0: see :func:`worker.engine.longform.batched`; with word timestamps too, when asked)
run here, on the engine's exact thread, beside the lanes, on a copy of the model of their own
(whisper hooks the modules of the model it runs for word timestamps).
The job's stop check is polled at each window, as the encoder starts it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from worker.engine.longform import JobState, check_options
from worker.engine.types import (
    HOP_LENGTH,
    SAMPLE_RATE,
    EngineJob,
    EngineResult,
    EngineStopped,
    result_of,
)

if TYPE_CHECKING:
    from whisper.model import Whisper

    from worker.engine.stats import EngineStats

_WORD_PUNCT_DEFAULTS = {
    "prepend_punctuations": "\"'“¿([{-",
    "append_punctuations": "\"'.。,，!！?？:：”)]}、",
}


class StopAtWindowError(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def run_exact_alone(
    model: Whisper,
    state: JobState,
    stop_check: Callable[[], str | None] | None,
    stats: EngineStats,
) -> None:
    """One job through whisper's transcribe(), its future settled; ``model`` is the caller's
    alone while it runs."""

    def at_window(*_: Any) -> None:
        # every decode() encodes its window first: a window boundary
        if stop_check is not None and (reason := stop_check()):
            raise StopAtWindowError(reason)

    hook = model.encoder.register_forward_pre_hook(at_window)
    start = time.perf_counter()
    try:
        out = transcribe(model, state.job)
    except StopAtWindowError as stop:
        spent = state.runtime_s + time.perf_counter() - start
        state.fail(EngineStopped(stop.reason, round(spent * 1000)))
    except BaseException as exc:
        state.fail(exc)
    else:
        state.runtime_s += time.perf_counter() - start
        stats.add_exact(time.perf_counter() - start)
        state.succeed(result_of(out.raw, len(state.job.audio), state.runtime_s))
    finally:
        hook.remove()


def transcribe(model: Whisper, job: EngineJob) -> EngineResult:
    """Sequential openai-whisper ``transcribe()`` of one job (fp16 on CUDA)."""
    import whisper

    device = next(model.parameters()).device
    opts = job.options
    check_options(model, opts)
    audio = torch.from_numpy(np.ascontiguousarray(job.audio, dtype=np.float32))
    kwargs = opts.transcribe_kwargs(fp16=device.type == "cuda")
    kwargs["clip_timestamps"] = clips_within(opts.clip_seconds(), len(job.audio))
    if getattr(opts, "word_timestamps", False):
        kwargs["word_timestamps"] = True
        for name, default in _WORD_PUNCT_DEFAULTS.items():
            kwargs.setdefault(name, getattr(opts, name, default))
    start = time.perf_counter()
    with torch.inference_mode():
        out = whisper.transcribe(model, audio, **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result_of(out, len(job.audio), time.perf_counter() - start)


def clips_within(clips: list[float], n_samples: int) -> list[float]:
    """whisper's clip list, cut at the end of the audio. Past the end a clip's window is
    empty (segment_size 0 or below), so transcribe() can decode it again and again without
    moving on; a clip that starts after the end is skipped by whisper anyway. Unchanged for
    clips inside the audio."""
    content_frames = n_samples // HOP_LENGTH  # transcribe()'s mel frames of the audio itself
    frames_per_s = SAMPLE_RATE // HOP_LENGTH
    end_s = content_frames / frames_per_s
    kept: list[float] = []
    for i in range(0, len(clips), 2):
        start, end = clips[i], clips[i + 1] if i + 1 < len(clips) else None
        if round(start * frames_per_s) >= content_frames:
            break  # the clips increase (the API checks): every later one is past the end too
        kept.append(start)
        if end is not None:
            kept.append(end if round(end * frames_per_s) <= content_frames else end_s)
    if not kept and clips:
        return [end_s, end_s]  # nothing to transcribe; an empty list would mean the whole file
    return kept
