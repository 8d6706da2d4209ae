"""Parity of the batched engine in mixed batches: many jobs with different options (greedy,
beam search at several patiences, prompts, ``condition_on_previous_text`` off, a shorter
fallback ladder) submitted at once to one engine at its defaults, each compared with
sequential ``whisper.transcribe()`` of the same file with the same options.

Real tiny.en (the tests' importer), the espeak-ng corpus of ``bench.engine_bench`` cycled to
``--files`` files (two clips over 30 s). Prints a Markdown table per option group: clips,
texts identical to ``transcribe()``, WER of each against the script, and the wall times.

    .venv/bin/python -m bench.parity_bench            # 64 files
    .venv/bin/python -m bench.parity_bench --files 16

Asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

# (label, API form fields): each file takes the next group in turn
GROUPS: tuple[tuple[str, dict[str, str]], ...] = (
    ("greedy (API defaults)", {}),
    ("beam 5, patience 1", {"patience": "1"}),
    ("greedy, initial_prompt", {"initial_prompt": "Office meeting notes."}),
    ("beam 5, patience 2", {"patience": "2"}),
    ("greedy, condition_on_previous_text off", {"condition_on_previous_text": "false"}),
    (
        "beam 5, patience 0.5, initial_prompt",
        {"patience": "0.5", "initial_prompt": "Office meeting notes."},
    ),
    ("greedy, temperature 0 then 0.5, 1.0", {"temperature_increment_on_fallback": "0.5"}),
    (
        "beam 5, patience 1, condition_on_previous_text off",
        {"patience": "1", "condition_on_previous_text": "false"},
    ),
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=64)
    args = ap.parse_args(argv)

    import torch
    import whisper

    from app.jobs.options import parse_options
    from bench.engine_bench import build_corpus, corpus_wer
    from tests.support.real_models import tiny_en_checkpoint
    from worker.engine import Engine, EngineJob

    model = whisper.load_model(str(tiny_en_checkpoint()), device="cpu")
    started = datetime.now(UTC)
    with tempfile.TemporaryDirectory(prefix="wq-parity-") as tmp:
        clips = build_corpus(False, Path(tmp))
    files = [clips[i % len(clips)] for i in range(args.files)]
    options = [parse_options(dict(GROUPS[i % len(GROUPS)][1])) for i in range(args.files)]

    engine = Engine(model)
    try:
        engine.submit(EngineJob(files[0].audio, options[0])).result()  # warm-up
        start = time.perf_counter()
        futures = [
            engine.submit(EngineJob(f.audio, o)) for f, o in zip(files, options, strict=True)
        ]
        ours = [fut.result().text for fut in futures]
        engine_s = time.perf_counter() - start
        stats = dict(engine.stats)
    finally:
        engine.close(10)

    start = time.perf_counter()
    refs = []
    for f, o in zip(files, options, strict=True):
        with torch.inference_mode():
            out = whisper.transcribe(
                model, torch.from_numpy(f.audio), **o.transcribe_kwargs(fp16=False)
            )
        refs.append(str(out["text"]).strip())
    sequential_s = time.perf_counter() - start

    audio_s = sum(f.seconds for f in files)
    print(
        f"# parity in mixed batches, {started:%Y-%m-%d %H:%M} UTC, {platform.node()},"
        f" {os.cpu_count()} CPUs, torch {torch.__version__}, load {os.getloadavg()[0]:.1f};"
        f" tiny.en fp32; {len(files)} files, {audio_s:.1f} s of audio, all submitted at once"
        f" to one engine ({engine.lanes} lane(s), {engine.max_batch_rows} rows,"
        f" projection {engine.projection})"
    )
    print()
    print("| options | files | text identical to transcribe() | WER engine | WER transcribe() |")
    print("|---|---|---|---|---|")
    for g, (label, _) in enumerate(GROUPS):
        idx = [i for i in range(len(files)) if i % len(GROUPS) == g]
        if not idx:
            continue
        same = sum(ours[i] == refs[i] for i in idx)
        script = [files[i].text for i in idx]
        print(
            f"| {label} | {len(idx)} | {same}/{len(idx)} |"
            f" {corpus_wer(script, [ours[i] for i in idx]):.3f} |"
            f" {corpus_wer(script, [refs[i] for i in idx]):.3f} |"
        )
    same = sum(a == b for a, b in zip(ours, refs, strict=True))
    script = [f.text for f in files]
    print(
        f"| **all** | {len(files)} | {same}/{len(files)} | {corpus_wer(script, ours):.3f} |"
        f" {corpus_wer(script, refs):.3f} |"
    )
    print()
    print(
        f"wall: engine {engine_s:.1f} s, sequential transcribe() {sequential_s:.1f} s"
        f" ({sequential_s / engine_s:.2f}x); engine: {stats['windows']:.0f} windows,"
        f" {stats['decode_passes']:.0f} decode passes, of which {stats['beam_passes']:.0f} beam"
        f" passes over {stats['beam_jobs']:.0f} job-windows; {stats['exact_jobs']:.0f} jobs on"
        " whisper's own transcribe()"
    )
    print(f"load at end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
