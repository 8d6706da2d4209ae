"""The engine on a lent GPU, in one run: sequential ``whisper.transcribe()`` against the batched
engine on the same model and audio, throughput (× real time) with WER beside it.

Made for the GPU machine of ``../shared/gpu/README.md``: no ffmpeg, no database, no jiwer there,
so it reads 16 kHz int16 ``.npy`` clips, the model from a checkpoint path, and computes WER
itself. The clips are the three espeak-ng sentences ``pack.sh`` speaks (their texts are below)
and long-form files built from them (30-50 s: several windows, prompts from earlier ones).

    python3 -m bench.gpu_bench --model /tmp/gpukeep/tiny_en.pt --audio /tmp/gpukeep/audio

``--step-modes eager,graph`` (the default on CUDA) runs each batch size with the decoder step
as eager torch and as a CUDA graph replayed per step (``static``: the graph's shapes, not
captured), so one run says which is faster.

``--word-timestamps`` runs the corpus with word timestamps on both sides, and says how far the
engine's word times are from sequential transcribe()'s (issue 24 allows 20 ms on a GPU).
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from app.jobs.options import TranscribeOptions
from bench.npy_corpus import Clip, corpus_wer, load_corpus
from worker.engine import Engine, EngineJob, EngineResult


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_sequential(
    model: torch.nn.Module, clips: Sequence[Clip], opts: TranscribeOptions
) -> list[dict[str, Any]]:
    """transcribe()'s result dict of each clip."""
    import whisper

    kwargs = opts.transcribe_kwargs(fp16=torch.cuda.is_available())
    out = []
    for clip in clips:
        with torch.inference_mode():
            out.append(whisper.transcribe(model, torch.from_numpy(clip.audio), **kwargs))
    sync()
    return out


SUBMIT_THREADS = 16  # as a worker's Celery threads: each submit makes its job's log-mel


def run_engine(
    engine: Engine, clips: Sequence[Clip], opts: TranscribeOptions
) -> list[EngineResult]:
    with ThreadPoolExecutor(max_workers=SUBMIT_THREADS) as pool:
        futures = list(pool.map(lambda clip: engine.submit(EngineJob(clip.audio, opts)), clips))
    return [f.result() for f in futures]


def word_drift(
    clips: Sequence[Clip], results: Sequence[EngineResult], reference: dict[str, dict[str, Any]]
) -> str:
    """How far the engine's word times are from sequential transcribe()'s, over the files
    whose words are the same on both sides."""
    worst, words, files = 0.0, 0, 0
    for clip, got in zip(clips, results, strict=True):
        ref = reference.get(clip.name)
        if ref is None:
            continue
        ours = [w for s in got.raw["segments"] for w in s.get("words", [])]
        theirs = [w for s in ref["segments"] for w in s.get("words", [])]
        if [w["word"] for w in ours] != [w["word"] for w in theirs]:
            continue
        files += 1
        words += len(ours)
        for a, b in zip(ours, theirs, strict=True):
            worst = max(worst, abs(a["start"] - b["start"]), abs(a["end"] - b["end"]))
    return (
        f"word times: max |engine - sequential| {worst * 1000:.0f} ms over {words} words "
        f"of {files}/{len(clips)} files with the same words"
    )


def row(name: str, clips: Sequence[Clip], texts: Sequence[str], seconds: float) -> list[str]:
    audio_s = sum(c.seconds for c in clips)
    wer = corpus_wer([c.text for c in clips], texts)
    return [
        name,
        str(len(clips)),
        f"{audio_s:,.0f}",
        f"{seconds:.2f}",
        f"{audio_s / seconds:,.0f}",
        f"{wer * 100:.2f}",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    import whisper

    parser = argparse.ArgumentParser(prog="python -m bench.gpu_bench", description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--audio", required=True, type=Path)
    parser.add_argument("--jobs", type=int, default=1024, help="files the engine transcribes")
    parser.add_argument("--sequential-files", type=int, default=15)
    parser.add_argument("--batch-rows", default="64,256,512")
    parser.add_argument("--budget-s", type=float, default=300, help="skip configs past this")
    parser.add_argument(
        "--patience", type=float, default=None, help="beam search of 5 at this patience"
    )
    parser.add_argument(
        "--word-timestamps", action="store_true", help="word timestamps on both sides"
    )
    parser.add_argument(
        "--step-modes",
        default=None,
        help="decoder step modes to compare (eager, static, graph); default eager,graph on "
        "CUDA, eager,static elsewhere",
    )
    args = parser.parse_args(argv)

    started = time.monotonic()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = whisper.load_model(args.model, device=device)
    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    print(f"# whisperq engine on {name}, torch {torch.__version__}, {dt.date.today()}")
    print(f"model {args.model} (multilingual={model.is_multilingual}); fp16={device == 'cuda'}")
    variants = load_corpus(args.audio)
    # the hosted API's defaults: greedy (or beam search), fallback, prompts on
    opts = TranscribeOptions(patience=args.patience, word_timestamps=args.word_timestamps)
    search = "greedy" if args.patience is None else f"beam 5, patience {args.patience}"
    print(f"options: {search}{', word timestamps' if args.word_timestamps else ''}")
    seq_clips = [variants[i % len(variants)] for i in range(args.sequential_files)]
    eng_clips = [variants[i % len(variants)] for i in range(args.jobs)]

    headers = ["system", "files", "audio s", "wall s", "× real time", "WER %"]
    rows: list[list[str]] = []
    run_sequential(model, variants[:2], opts)  # warm-up: CUDA context, kernels, tokenizer
    t = time.perf_counter()
    seq_results = run_sequential(model, seq_clips, opts)
    seq_s = time.perf_counter() - t
    seq_texts = [str(r["text"]) for r in seq_results]
    rows.append(row("openai-whisper transcribe(), sequential", seq_clips, seq_texts, seq_s))
    seq_rate = sum(c.seconds for c in seq_clips) / seq_s
    reference = {c.name: text.strip() for c, text in zip(seq_clips, seq_texts, strict=True)}
    seq_by_name = {c.name: r for c, r in zip(seq_clips, seq_results, strict=True)}

    ratios = []
    modes = (args.step_modes or ("eager,graph" if device == "cuda" else "eager,static")).split(",")
    configs = [(int(x), mode) for x in args.batch_rows.split(",") for mode in modes]
    for rows_n, mode in configs:
        label = f"max_batch_rows={rows_n}, step {mode}"
        if time.monotonic() - started > args.budget_s:
            print(f"(skipped {label}: over the {args.budget_s:.0f} s budget)")
            continue
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        try:
            engine = Engine(model, max_batch_rows=rows_n, max_wait_ms=5, step_mode=mode)
            run_engine(engine, variants * 2, opts)  # warm-up
            t = time.perf_counter()
            results = run_engine(engine, eng_clips, opts)
            sync()
            took = time.perf_counter() - t
            texts = [r.text for r in results]
            engine.close(10)
        except Exception as exc:  # print what broke, keep the rest of the table
            print(f"engine {label} failed: {type(exc).__name__}: {exc}")
            continue
        rows.append(row(f"whisperq engine, {label}", eng_clips, texts, took))
        same = sum(
            text.strip() == reference.get(c.name) for c, text in zip(eng_clips, texts, strict=True)
        )
        rate = sum(c.seconds for c in eng_clips) / took
        ratios.append(
            f"rows={rows_n}, step {mode}: {rate / seq_rate:,.1f}× sequential, "
            f"{same}/{len(eng_clips)} texts identical to sequential transcribe() of the same file"
        )
        if device == "cuda":
            peak = torch.cuda.max_memory_allocated() / 2**20
            ratios[-1] += f", peak GPU memory {peak:,.0f} MiB"
        if args.word_timestamps:
            ratios[-1] += "; " + word_drift(eng_clips, results, seq_by_name)
    print()
    print("| " + " | ".join(headers) + " |")
    print("|" + "---|" * len(headers))
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print()
    for line in ratios:
        print("- " + line)
    print(f"(total {time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
