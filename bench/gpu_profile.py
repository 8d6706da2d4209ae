"""Where the batched engine's time goes on a GPU: wall time per engine stage (log-mel, encoder,
decoder, per-job bookkeeping) over a full run, and torch profiler's top ops for a short one.

    python3 -m bench.gpu_profile --model /tmp/gpukeep/tiny_en.pt --audio /tmp/gpukeep/audio
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch

from app.jobs.options import TranscribeOptions
from bench.gpu_bench import run_engine
from bench.npy_corpus import load_corpus
from worker import engine as engine_mod
from worker.engine.decoding import BatchDecoder

TOTALS: dict[str, float] = defaultdict(float)
CALLS: dict[str, int] = defaultdict(int)


def timed(owner: Any, name: str, label: str, cuda_sync: bool) -> None:
    inner: Callable[..., Any] = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        out = inner(*args, **kwargs)
        if cuda_sync and torch.cuda.is_available():
            torch.cuda.synchronize()
        TOTALS[label] += time.perf_counter() - start
        CALLS[label] += 1
        return out

    setattr(owner, name, wrapper)


def main(argv: Sequence[str] | None = None) -> int:
    import whisper

    parser = argparse.ArgumentParser(prog="python -m bench.gpu_profile", description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--audio", required=True)
    parser.add_argument("--jobs", type=int, default=1024)
    parser.add_argument("--rows", type=int, default=512)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = whisper.load_model(args.model, device=device)
    variants = load_corpus(__import__("pathlib").Path(args.audio))
    clips = [variants[i % len(variants)] for i in range(args.jobs)]
    opts = TranscribeOptions()
    eng = engine_mod.Engine(model, max_batch_rows=args.rows, max_wait_ms=5)
    run_engine(eng, variants * 2, opts)  # warm-up

    timed(engine_mod.scheduler, "log_mel", "log-mel (per job, on the submitting threads)", False)
    timed(engine_mod._JobState, "next_window", "window slice", False)
    timed(engine_mod._JobState, "row", "row spec (prompt, per job)", False)
    timed(engine_mod._JobState, "accept", "accept (seek, segments, per job)", False)
    timed(engine_mod._JobState, "to_decoded", "to_decoded (text, ratios)", False)
    timed(engine_mod.Engine, "_encode", "encoder", True)
    timed(BatchDecoder, "decode", "decoder (all steps)", True)
    steps: list[int] = []
    inner_decode = BatchDecoder.decode

    def count_steps(self: BatchDecoder, *a: Any, **k: Any) -> Any:
        out = inner_decode(self, *a, **k)
        steps.append(max((r.steps for r in out), default=0))
        return out

    BatchDecoder.decode = count_steps  # type: ignore[method-assign]
    start = time.perf_counter()
    run_engine(eng, clips, opts)
    wall = time.perf_counter() - start
    audio_s = sum(c.seconds for c in clips)
    print(
        f"{len(clips)} jobs, {audio_s:,.0f} s audio, rows={args.rows}: {wall:.2f} s wall, "
        f"{audio_s / wall:,.0f}x real time; {len(steps)} decode passes, "
        f"{sum(steps)} decoder steps (longest row per pass)"
    )
    print("| stage | seconds | % of wall | calls |")
    print("|---|---|---|---|")
    for label, secs in sorted(TOTALS.items(), key=lambda kv: -kv[1]):
        print(f"| {label} | {secs:.2f} | {100 * secs / wall:.0f} | {CALLS[label]} |")
    dec = TOTALS["decoder (all steps)"]
    if steps:
        print(f"decoder: {1000 * dec / sum(steps):.2f} ms per step of a full batch")

    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    small = clips[: min(len(clips), args.rows)]
    with profile(activities=acts) as prof:
        run_engine(eng, small, opts)
    sort = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    print(
        prof.key_averages().table(
            sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=40
        )
    )
    print(prof.key_averages().table(sort_by=sort, row_limit=8, max_name_column_width=40))
    eng.close(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
