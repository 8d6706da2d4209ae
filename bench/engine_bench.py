"""Engine benchmark: throughput and WER on real speech, and host work per decoded token.

Run from the repository root::

    python -m bench.engine_bench [--quick] [--device cpu|cuda] [--threads N]

Prints Markdown tables; nothing here asserts on timings. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import platform
import re
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from app.jobs.options import BEAM_SIZE, TranscribeOptions
from bench.engine_ops import CountingEngine, OpCounter, markdown_table
from worker.engine import Engine, EngineJob

SAMPLE_RATE = 16_000

# Plain office sentences: tiny.en gets these nearly right, so the WER column measures the
# systems, not the test material. No numbers (digits vs words would count as errors).
SHORT_TEXTS = (
    "Please send the report to the whole team before the end of the day, and copy your manager.",
    "The meeting has been moved to the large room on the second floor. "
    "Thank you for your help with this project.",
    "I will call the client this afternoon to confirm the delivery date. "
    "Please let me know if anything changes before then.",
    "We need to update the budget before the board meeting next week. "
    "The finance team has asked for the final figures by Thursday. "
    "Please check your work and send it to me as soon as you can.",
    "The new software will be installed on all computers over the weekend. "
    "Please save your work and shut down your computer before you leave on Friday.",
    "Our manager asked everyone to share their ideas for the new website. "
    "She would like to see a simple design that is easy to use. "
    "We will discuss the best ideas at the next team meeting.",
    "The coffee machine in the kitchen has been repaired, so you can make coffee again.",
    "The training session will start right after lunch. "
    "Please bring your laptop and a notebook. "
    "The trainer will show us how to use the new customer system, "
    "and there will be time for questions at the end.",
)

# Longer than one 30 s window, so transcribe()'s seek/prompt logic runs across windows.
LONG_TEXTS = (
    "Good morning everyone, and thank you for joining the call. "
    "Today we will review the progress on the new product and plan the work for the coming "
    "weeks. The design team has finished the first version of the user interface. "
    "The customers who tried it said that it was clear and easy to use. "
    "The engineering team is still working on the search feature, and they expect to "
    "finish it soon. We are still waiting for the contract from the legal team, so the "
    "launch date is not final yet. Please read the attached document and send me your "
    "comments by the end of the week. If you have any questions, you can ask them now or "
    "write to me later.",
    "Welcome to the office. This short guide explains what you need to know during your "
    "first week. Your manager will meet you at the front desk and show you around the "
    "building. The kitchen is on the ground floor, next to the large meeting room. "
    "Please remember to lock the front door when you leave the office in the evening. "
    "The parking lot will be closed on Friday for cleaning, so please take the train or "
    "the bus that day. Every morning the team meets for a short update at the start of "
    "the day. Everyone shares what they did yesterday and what they plan to do today. "
    "If you need a new computer or a phone, please ask the support team. They are "
    "friendly and they usually answer within a few hours. We hope you enjoy working with "
    "us, and we look forward to hearing your ideas.",
)

BATCH_ROWS = (1, 16, 64, 256)

# DESIGN.md, section "The engine": openai-whisper 20250625 decode() on CPU, 1-layer random
# model. Quoted for comparison only; the rows above them are measured by this script.
DESIGN_REFERENCE = {
    "timestamps on": (117, 408, 1339, 5064),
    "without_timestamps": (93, 99, 116, 183),
}

Audio = npt.NDArray[np.float32]


# ----------------------------------------------------------------------------- helpers


def say(text: str = "") -> None:
    print(text, flush=True)


def cpu_model() -> str:
    try:
        for raw in Path("/proc/cpuinfo").read_text().splitlines():
            if raw.startswith("model name"):
                return raw.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment_line(device: torch.device, threads: int) -> str:
    import whisper

    parts = [
        f"device: {device.type}",
        f"torch {torch.__version__}",
        f"openai-whisper {whisper.__version__}",
        f"threads: {threads} (torch.set_num_threads; faster-whisper cpu_threads)",
        f"CPU: {cpu_model()} ({os.cpu_count()} logical cores)",
    ]
    if device.type == "cuda":
        parts.insert(1, f"GPU: {torch.cuda.get_device_name(device)}")
    parts.append(f"date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}")
    return "; ".join(parts)


def normalize(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def corpus_wer(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    import jiwer

    return float(jiwer.wer([normalize(t) for t in references], [normalize(t) for t in hypotheses]))


# ------------------------------------------------------------- section 1: real speech


@dataclass(frozen=True)
class Clip:
    name: str
    text: str
    audio: Audio

    @property
    def seconds(self) -> float:
        return len(self.audio) / SAMPLE_RATE


@dataclass
class System:
    name: str
    transcribe_all: Callable[[Sequence[Clip]], list[str]]
    walls: list[float] = field(default_factory=list)
    texts: tuple[str, ...] = ()

    def run(self, clips: Sequence[Clip]) -> None:
        start = time.perf_counter()
        texts = self.transcribe_all(clips)
        self.walls.append(time.perf_counter() - start)
        self.texts = tuple(texts)


def build_corpus(quick: bool, workdir: Path) -> list[Clip]:
    import whisper

    from tests.support.real_models import speak

    short = SHORT_TEXTS[:4] if quick else SHORT_TEXTS
    long = LONG_TEXTS[:1] if quick else LONG_TEXTS
    named = [(f"short{i}", t) for i, t in enumerate(short)]
    named += [(f"long{i}", t) for i, t in enumerate(long)]
    clips = []
    for name, text in named:
        wav = speak(text, workdir / f"{name}.wav")
        audio = whisper.load_audio(str(wav)).astype(np.float32)
        clips.append(Clip(name, text, audio))
    return clips


def engine_system(engine: Engine, opts: TranscribeOptions, in_flight: int) -> System:
    def one(clip: Clip) -> str:
        return engine.submit(EngineJob(clip.audio, opts)).result().text

    def transcribe_all(clips: Sequence[Clip]) -> list[str]:
        # Several submitting threads, as Celery's threads pool has several tasks in flight.
        with ThreadPoolExecutor(max_workers=in_flight) as pool:
            return list(pool.map(one, clips))

    return System(
        f"whisperq Engine (batched, {in_flight} jobs in flight, max_batch_rows={in_flight})",
        transcribe_all,
    )


def transcribe_system(model: Any, opts: TranscribeOptions, fp16: bool) -> System:
    import whisper

    kwargs = opts.transcribe_kwargs(fp16=fp16)

    def one(clip: Clip) -> str:
        with torch.inference_mode():
            return str(whisper.transcribe(model, torch.from_numpy(clip.audio), **kwargs)["text"])

    return System("openai-whisper transcribe(), sequential", lambda clips: [one(c) for c in clips])


def faster_whisper_system(opts: TranscribeOptions, device: torch.device, threads: int) -> System:
    beam = BEAM_SIZE if opts.patience is not None else 1
    from faster_whisper import WhisperModel

    from tests.support.real_models import tiny_en_ct2_dir

    compute_type = "float16" if device.type == "cuda" else "float32"
    model = WhisperModel(
        str(tiny_en_ct2_dir()), device=device.type, compute_type=compute_type, cpu_threads=threads
    )

    def one(clip: Clip) -> str:
        segments, _ = model.transcribe(
            clip.audio,
            language=opts.language,
            task=opts.task,
            beam_size=beam,
            patience=opts.patience or 1.0,
            best_of=1,  # whisper.transcribe() samples one candidate per fallback temperature
            temperature=list(opts.temperatures()),
            compression_ratio_threshold=opts.compression_ratio_threshold,
            log_prob_threshold=opts.logprob_threshold,
            no_speech_threshold=opts.no_speech_threshold,
            condition_on_previous_text=opts.condition_on_previous_text,
            initial_prompt=opts.initial_prompt,
            suppress_tokens=opts.suppress_token_ids(),
            vad_filter=False,
        )
        return "".join(s.text for s in segments)  # the generator does the work

    return System(
        f"faster-whisper {compute_type}, beam {beam}, sequential",
        lambda clips: [one(c) for c in clips],
    )


def section_throughput(
    quick: bool,
    device: torch.device,
    threads: int,
    in_flight: int,
    rounds: int,
    patience: float | None,
) -> None:
    import whisper

    from tests.support.real_models import tiny_en_checkpoint

    say("## 1. Throughput and WER on real speech (tiny.en, espeak-ng voice)")
    say()
    with tempfile.TemporaryDirectory(prefix="whisperq-bench-") as tmp:
        clips = build_corpus(quick, Path(tmp))
    audio_s = sum(c.seconds for c in clips)
    lengths = ", ".join(f"{c.seconds:.1f}" for c in clips)
    say(f"corpus: {len(clips)} clips, {audio_s:.1f} s of audio (clip seconds: {lengths})")

    opts = TranscribeOptions(language="en", patience=patience)
    fp16 = device.type == "cuda"
    search = "greedy" if patience is None else f"beam search of {BEAM_SIZE}, patience {patience}"
    say(
        f"options: {search}, language=en, temperature ladder {opts.temperatures()}, "
        f"compression_ratio_threshold={opts.compression_ratio_threshold}, "
        f"logprob_threshold={opts.logprob_threshold}, "
        f"no_speech_threshold={opts.no_speech_threshold}, "
        f"condition_on_previous_text={opts.condition_on_previous_text}, fp16={fp16}"
    )
    say()

    model = whisper.load_model(str(tiny_en_checkpoint()), device=device)
    engine = Engine(model, max_batch_rows=in_flight)
    try:
        systems = [engine_system(engine, opts, in_flight), transcribe_system(model, opts, fp16)]
        for system in systems:
            system.transcribe_all(clips[:1])  # warm-up, untimed
        try:
            peer = faster_whisper_system(opts, device, threads)
            peer.transcribe_all(clips[:1])
            systems.append(peer)
        except Exception as exc:  # e.g. a GPU box whose ctranslate2 lacks its CUDA libraries
            say(f"faster-whisper peer left out: {type(exc).__name__}: {exc}")
            say()
        # Interleaved rounds, best kept: a shared machine's background load hits one round
        # of one system, not the comparison.
        for _ in range(rounds):
            for system in systems:
                system.run(clips)
    finally:
        engine.close()

    baseline = min(systems[1].walls)
    refs = [c.text for c in clips]
    rows = [
        [
            s.name,
            f"{audio_s:.1f}",
            f"{min(s.walls):.2f}",
            f"{audio_s / min(s.walls):.1f}",
            f"{baseline / min(s.walls):.2f}",
            f"{corpus_wer(refs, s.texts):.3f}",
        ]
        for s in systems
    ]
    headers = ["system", "audio s", "wall s", "× real time", "vs sequential transcribe", "WER"]
    say(markdown_table(headers, rows))
    say()
    say(f"wall s: best of {rounds} interleaved rounds, after one untimed warm-up clip; all rounds:")
    for s in systems:
        say(f"- {s.name}: {', '.join(f'{w:.2f}' for w in s.walls)}")
    for s in (s for s in systems if s is not systems[1]):
        same = sum(
            normalize(a) == normalize(b) for a, b in zip(s.texts, systems[1].texts, strict=True)
        )
        say(f"{s.name}: text identical to sequential transcribe() on {same}/{len(clips)} clips")
    say("WER: corpus-level over all clips, lowercased, punctuation stripped, vs the script text.")
    say()


# --------------------------------------------------- section 2: host work per token


@dataclass(frozen=True)
class DecodeCount:
    ops: int
    steps: int


def count_decode(
    model: Any,
    mel: torch.Tensor,
    without_timestamps: bool,
    steps: int,
    inference_mode: bool,
    beam_size: int | None = None,
) -> DecodeCount:
    import whisper
    from whisper.decoding import DecodingOptions

    eot = whisper.tokenizer.get_tokenizer(
        model.is_multilingual, num_languages=model.num_languages, language="en"
    ).eot
    options = DecodingOptions(
        language="en",
        fp16=False,
        without_timestamps=without_timestamps,
        sample_len=steps,
        # EOT suppressed: every row runs exactly `steps` steps, whatever the random model says.
        suppress_tokens=[-1, eot],
        beam_size=beam_size,
    )
    forwards = 0

    def on_forward(*_: Any) -> None:
        nonlocal forwards
        forwards += 1

    hook = model.decoder.register_forward_pre_hook(on_forward)
    counter = OpCounter()
    # Under inference_mode the mode sees composite ops undecomposed (linear rather than
    # t + addmm, plus same-dtype .to() calls), so the grad mode changes the count a little.
    grad_mode = torch.inference_mode() if inference_mode else contextlib.nullcontext()
    try:
        with grad_mode, counter:
            whisper.decode(model, mel, options)
    finally:
        hook.remove()
    return DecodeCount(counter.ops, forwards)


@dataclass(frozen=True)
class PerStep:
    ops_per_step: float
    one_time_ops: float


def decode_per_step(
    model: Any,
    mel: torch.Tensor,
    without_timestamps: bool,
    short: int,
    long: int,
    inference_mode: bool = False,
    beam_size: int | None = None,
) -> PerStep:
    a = count_decode(model, mel, without_timestamps, short, inference_mode, beam_size)
    b = count_decode(model, mel, without_timestamps, long, inference_mode, beam_size)
    if (a.steps, b.steps) != (short, long):
        raise RuntimeError(f"expected {short}/{long} decoder steps, counted {a.steps}/{b.steps}")
    # The difference cancels the encoder, setup and per-row finalisation, which run once.
    per_step = (b.ops - a.ops) / (b.steps - a.steps)
    return PerStep(per_step, a.ops - per_step * a.steps)


@dataclass(frozen=True)
class EngineCount:
    jobs: int
    decoder_calls: int
    rows_per_call: float
    ops: int
    wall_s: float


def count_engine(
    jobs: int, device: torch.device, sample_len: int, patience: float | None = None
) -> EngineCount:
    """N jobs of 2 s noise decoded by one engine, EOT suppressed: every row runs exactly
    `sample_len` steps, so two runs differing only in sample_len differ only in steps. With
    a patience, every job is a beam search (its beams never finish: EOT is suppressed)."""
    from tests.support.random_model import random_model

    model = random_model().to(device)
    counter = OpCounter()
    eot = 50257  # the multilingual vocabulary's <|endoftext|> (the random model's)
    # Thresholds off: one decode per 30 s window at the first temperature.
    opts = TranscribeOptions(
        language="en",
        suppress_tokens=f"-1,{eot}",
        temperature_increment_on_fallback=None,
        compression_ratio_threshold=None,
        logprob_threshold=None,
        no_speech_threshold=None,
        patience=patience,
    )
    audios = [
        (np.random.default_rng(seed).standard_normal(2 * SAMPLE_RATE) * 0.1).astype(np.float32)
        for seed in range(jobs)
    ]
    # max_wait long enough that all N jobs form one batch (it closes as soon as it is full)
    # One lane: the counter is entered on the lane's thread, and every job is in its batch.
    engine = CountingEngine(
        model, counter, max_batch_rows=jobs, max_wait_ms=60_000, sample_len=sample_len, lanes=1
    )
    rows: list[int] = []
    hook = engine.decoder.register_forward_pre_hook(
        lambda _m, args: rows.append(int(args[0].shape[0]))
    )
    start = time.perf_counter()
    try:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            list(pool.map(lambda a: engine.submit(EngineJob(a, opts)).result(), audios))
    finally:
        engine.close()
        hook.remove()
    return EngineCount(
        jobs=jobs,
        decoder_calls=len(rows),
        rows_per_call=sum(rows) / len(rows),
        ops=counter.ops,
        wall_s=time.perf_counter() - start,
    )


def engine_rows(
    pairs: Sequence[tuple[EngineCount, EngineCount]], steps: int, label: str = ""
) -> list[list[str]]:
    """Table rows of engine runs in pairs (short run, long run `steps` tokens longer)."""
    return [
        [f"{label}mean batch rows per decoder call"] + [f"{b.rows_per_call:.2f}" for _, b in pairs],
        [f"{label}ops to advance every in-flight job one token"]
        + [f"{(b.ops - a.ops) / steps:.0f}" for a, b in pairs],
        [f"{label}wall s, long run (with counting)"] + [f"{b.wall_s:.1f}" for _, b in pairs],
    ]


def section_ops(quick: bool, device: torch.device) -> None:
    from tests.support.random_model import random_model

    say("## 2. Host work per decoded token (torch ops dispatched per decode step)")
    say()
    # The same step counts in --quick: timestamp-rule ops depend on how far decoding has
    # gone, so quick and full numbers stay comparable only if the steps are the same.
    short, long = 8, 40
    say(
        "1-layer random Whisper (tests.support.random_model), greedy, language=en, fp16=False, "
        f"on {device.type}. decode() runs with sample_len={short} and {long} and EOT suppressed; "
        "ops/step = difference of the two counts / difference of the decoder calls, which "
        "cancels the one-time ops (encoder, setup, per-row finalisation). Timestamp-rule ops "
        "depend on which tokens the model picks, so the timestamps-on rows vary by a few ops "
        "per row with the data, and their 'one-time' row also absorbs the first steps, which "
        "run more timestamp-rule ops than the average step."
    )
    say()
    model = random_model().to(device)
    # (label, without_timestamps, inside torch.inference_mode)
    variants = (
        ("decode(), timestamps on (peer; what transcribe() runs)", False, False),
        ("decode(), without_timestamps=True (peer)", True, False),
        ("decode() in torch.inference_mode, timestamps on (as the engine runs it)", False, True),
    )
    measured: dict[str, list[PerStep]] = {label: [] for label, _, _ in variants}
    for rows in BATCH_ROWS:
        mel = torch.randn(rows, 80, 3000, generator=torch.Generator().manual_seed(rows)).to(device)
        for label, without, inference in variants:
            measured[label].append(decode_per_step(model, mel, without, short, long, inference))
    del model

    headers = ["ops per decode step", *(f"{r} rows" for r in BATCH_ROWS)]
    rows_out = [[label] + [f"{p.ops_per_step:.0f}" for p in measured[label]] for label in measured]
    rows_out += [
        [f"DESIGN.md reference, {name} (quoted, not measured here)"] + [f"{v}" for v in values]
        for name, values in DESIGN_REFERENCE.items()
    ]
    rows_out += [
        [f"one-time ops per call: {label}"] + [f"{p.one_time_ops:.0f}" for p in measured[label]]
        for label, _, inference in variants
        if not inference
    ]
    say(markdown_table(headers, rows_out))
    say()

    job_counts = (1, 16) if quick else BATCH_ROWS
    short_e, long_e = 8, 24
    pairs = [
        (count_engine(n, device, short_e), count_engine(n, device, long_e)) for n in job_counts
    ]
    say(
        "whisperq Engine: N jobs of 2 s noise submitted at once from N threads, one batch of N "
        "rows (max_batch_rows=N), EOT suppressed through the job's suppress_tokens so every "
        f"row runs exactly sample_len steps; engine run twice, sample_len={short_e} and "
        f"{long_e}; ops counted on the engine's own thread (everything it does: admission, "
        "log-mel, encoder, prefill, steps, segments). Ops to advance every in-flight job one "
        "token = (ops at the long run - ops at the short run) / "
        f"{long_e - short_e}: the per-job and per-window work cancels. "
        f"fp16={device.type == 'cuda'}."
    )
    say()
    headers = ["whisperq Engine", *(f"{n} jobs in flight" for n in job_counts)]
    rows_out = [
        ["decoder calls (short / long run)"]
        + [f"{a.decoder_calls} / {b.decoder_calls}" for a, b in pairs],
        ["ops, whole run (short / long)"] + [f"{a.ops} / {b.ops}" for a, b in pairs],
        *engine_rows(pairs, long_e - short_e),
    ]
    say(markdown_table(headers, rows_out))
    say()

    # Beam search: each job's 5 beams are rows of one pass. whisper's own beam search takes
    # one audio per decode() call (its cross-attention cache breaks with more), so N jobs
    # cost it N times the ops of one.
    model = random_model().to(device)
    mel = torch.randn(1, 80, 3000, generator=torch.Generator().manual_seed(1)).to(device)
    peer = decode_per_step(model, mel, False, short, long, inference_mode=True, beam_size=BEAM_SIZE)
    del model
    beam_pairs = [
        (count_engine(n, device, short_e, 1.0), count_engine(n, device, long_e, 1.0))
        for n in job_counts
    ]
    say(
        f"Beam search (beam {BEAM_SIZE}, patience 1, timestamps on), the same jobs and method "
        f"as the table above; each job's {BEAM_SIZE} beams are rows of the pass. The peer: "
        "openai-whisper decode() with its BeamSearchDecoder in torch.inference_mode, one audio "
        f"per call (sample_len {short} and {long}), times N."
    )
    say()
    headers = ["beam search", *(f"{n} jobs in flight" for n in job_counts)]
    rows_out = [
        *engine_rows(beam_pairs, long_e - short_e, "whisperq Engine: "),
        ["openai-whisper decode() beam, one audio per call: ops per token of N jobs"]
        + [f"{peer.ops_per_step * n:.0f}" for n in job_counts],
    ]
    say(markdown_table(headers, rows_out))
    say()


# ------------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.engine_bench", description=__doc__)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smaller corpus, fewer engine jobs: under 2 min on a 2-core CPU",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--threads",
        type=int,
        default=torch.get_num_threads(),
        help="torch.set_num_threads and faster-whisper cpu_threads",
    )
    parser.add_argument(
        "--in-flight",
        type=int,
        default=16,
        help="engine jobs submitted at once and the engine's max_batch_rows (section 1)",
    )
    parser.add_argument(
        "--rounds", type=int, default=None, help="timed rounds per system (2 quick, 3 full)"
    )
    parser.add_argument("--skip-throughput", action="store_true", help="only section 2")
    parser.add_argument("--skip-ops", action="store_true", help="only section 1")
    parser.add_argument(
        "--patience",
        type=float,
        default=None,
        help=f"section 1 with beam search of {BEAM_SIZE} at this patience (default: greedy)",
    )
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)

    from tests.support.real_models import warm_whisper_tokenizers

    warm_whisper_tokenizers()  # tokenizer loading stays out of every timed span

    started = time.perf_counter()
    say(f"# whisperq engine benchmark{' (--quick)' if args.quick else ''}")
    say()
    say(f"command: python -m bench.engine_bench {' '.join(argv)}".rstrip())
    say()
    say(f"## Environment\n\n{environment_line(device, args.threads)}")
    say()
    if not args.skip_throughput:
        rounds = args.rounds or (2 if args.quick else 3)
        section_throughput(args.quick, device, args.threads, args.in_flight, rounds, args.patience)
    if not args.skip_ops:
        section_ops(args.quick, device)
    say(f"total runtime: {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
