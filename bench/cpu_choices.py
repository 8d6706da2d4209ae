"""Why the CPU engine is built as it is: the measurements behind its three CPU choices, in one
run, on the machine at hand.

1. The vocabulary projection (the largest matmul of a decoder step): torch's ``h @ E.T``
   (MKL on x86) against oneDNN, per step at 1/8/16/32 rows, with the largest difference.
2. The encoder: milliseconds per 30 s window when 1/2/4/8/16 windows go through at once.
3. The engine alone on the service bench's 64 files (espeak-ng corpus, real tiny.en), all
   submitted at once: one lane with the batched encoder and MKL projection (the engine before
   these choices), then each choice added, with the texts compared to sequential
   ``whisper.transcribe()`` of each clip.

    .venv/bin/python -m bench.cpu_choices            # all three
    .venv/bin/python -m bench.cpu_choices --skip-engine

Prints Markdown tables; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch


def _per_call_ms(fn: Callable[[], Any], n: int) -> tuple[float, Any]:
    for _ in range(3):
        out = fn()
    start = time.perf_counter()
    for _ in range(n):
        out = fn()
    return (time.perf_counter() - start) / n * 1000, out


def projection(model: Any) -> None:
    emb = model.decoder.token_embedding.weight.detach()
    onednn = emb.contiguous().to_mkldnn()
    print("| rows | torch h @ E.T (ms) | oneDNN (ms) | speed-up | max abs diff | argmax equal |")
    print("|---|---|---|---|---|---|")
    for rows in (1, 8, 16, 32):
        h = torch.randn(rows, emb.shape[1])

        def mkl(h: torch.Tensor = h) -> torch.Tensor:
            out: torch.Tensor = (h @ emb.t()).float()
            return out

        def dnn(h: torch.Tensor = h) -> torch.Tensor:
            out: torch.Tensor = torch._C._nn.mkldnn_linear(h.to_mkldnn(), onednn, None).to_dense()
            return out

        t_mkl, ref = _per_call_ms(mkl, 40)
        t_dnn, got = _per_call_ms(dnn, 40)
        diff = float((ref - got).abs().max())
        same = bool(torch.equal(ref.argmax(-1), got.argmax(-1)))
        print(f"| {rows} | {t_mkl:.2f} | {t_dnn:.2f} | {t_mkl / t_dnn:.2f} | {diff:.1e} | {same} |")


def encoder(model: Any) -> None:
    mel = torch.randn(16, model.dims.n_mels, 3000)
    print("| windows per call | ms per window (wall) | CPU ms per window |")
    print("|---|---|---|")
    with torch.inference_mode():
        model.encoder(mel[:2])
        for b in (1, 2, 4, 8, 16):
            wall, cpu = time.perf_counter(), time.process_time()
            for i in range(0, 16, b):
                model.encoder(mel[i : i + b])
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            print(f"| {b} | {wall / 16 * 1000:.0f} | {cpu / 16 * 1000:.0f} |")


def engine_only(model: Any, n_files: int) -> None:
    import whisper

    from app.jobs.options import TranscribeOptions
    from bench.engine_bench import build_corpus
    from worker.engine import Engine, EngineJob

    workdir = Path(tempfile.mkdtemp(prefix="wq-cpu-choices-"))
    clips = build_corpus(False, workdir)
    audios = [whisper.load_audio(str(workdir / f"{c.name}.wav")) for c in clips]
    opts = TranscribeOptions()
    kwargs = opts.transcribe_kwargs(fp16=False)
    with torch.inference_mode():
        ref = [str(whisper.transcribe(model, a, **kwargs)["text"]).strip() for a in audios]
    order = [i % len(audios) for i in range(n_files)]
    seconds = sum(len(audios[i]) for i in order) / 16_000
    configs: list[tuple[str, int, bool, bool]] = [
        ("1 lane, batched encoder, torch projection", 1, False, False),
        ("1 lane, batched encoder, oneDNN projection", 1, False, True),
        ("1 lane, encoder one window at a time, oneDNN projection", 1, True, True),
        ("2 lanes, encoder one window at a time, oneDNN projection", 2, True, True),
        ("2 lanes, encoder one window at a time, torch projection", 2, True, False),
    ]
    print(
        f"{n_files} files, {seconds:.1f} s of audio, all submitted at once; 16 batch rows per "
        "lane, texts against sequential transcribe() of each clip"
    )
    print()
    print("| engine | wall s | CPU s | encoder s | decode s | passes | same text |")
    print("|---|---|---|---|---|---|---|")
    for name, lanes, per_window, onednn in configs:
        eng = Engine(model, max_batch_rows=16, ready_rows=n_files, max_wait_ms=50, lanes=lanes)
        try:
            if not per_window:
                eng.encoder_chunk = None
            # forced, whatever the engine's own measurement at start picked
            eng.decoder._embed_onednn = eng.decoder._onednn_weight if onednn else None
            eng.submit(EngineJob(audios[0], opts)).result()  # warm-up
            for k in eng.stats:
                eng.stats[k] = 0.0
            wall, cpu = time.perf_counter(), time.process_time()
            futures = [eng.submit(EngineJob(audios[i], opts)) for i in order]
            texts = [f.result().text for f in futures]
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        finally:
            eng.close(10)
        st = eng.stats
        same = sum(t == ref[i] for t, i in zip(texts, order, strict=True))
        print(
            f"| {name} | {wall:.1f} | {cpu:.1f} | {st['encoder_s']:.1f} | {st['decode_s']:.1f}"
            f" | {st['decode_passes']:.0f} | {same}/{n_files} |"
        )
    print()
    print("encoder s and decode s add up over lanes (two lanes: up to twice the wall).")
    eng = Engine(model)
    eng.close(10)
    print(
        f"The engine's defaults here: {eng.lanes} lane(s) x {eng.lane_threads} torch thread(s), "
        f"vocabulary projection picked at start: {eng.projection}."
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=64)
    ap.add_argument("--skip-engine", action="store_true")
    args = ap.parse_args(argv)

    import whisper

    from tests.support.real_models import tiny_en_checkpoint

    model = whisper.load_model(str(tiny_en_checkpoint()), device="cpu")
    started = datetime.now(UTC)
    print(
        f"# CPU choices, {started:%Y-%m-%d %H:%M} UTC, {platform.node()}, {os.cpu_count()} CPUs,"
        f" torch {torch.__version__} ({torch.get_num_threads()} threads), load"
        f" {os.getloadavg()[0]:.1f}; tiny.en fp32"
    )
    print()
    print("## 1. Vocabulary projection, one decoder step")
    print()
    projection(model)
    print()
    print("## 2. Encoder")
    print()
    encoder(model)
    if not args.skip_engine:
        print()
        print("## 3. The engine alone")
        print()
        engine_only(model, args.files)
    print()
    print(f"load at end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
