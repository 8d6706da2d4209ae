"""The exact path: openai-whisper's own ``transcribe()``, one job at a time.

Jobs whose options the batched windows cannot reproduce exactly (best_of > 1 at t > 0: see
:func:`worker.engine.longform.batched`; with word timestamps and clips too, when asked)
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

from worker.engine.longform import JobState, check_options, clips_within
from worker.engine.types import (
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
