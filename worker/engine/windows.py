"""One window of many jobs: the batched ``decode_with_fallback`` of ``whisper.transcribe()``.

:func:`step_window` takes the jobs a lane admitted, detects the languages still unknown (one
batch), cuts each job's current 30 s window, encodes them (on a GPU all at once, on a CPU a
window per call), then decodes them with the temperature fallback: every row at its first
temperature, then only the rows still failing at their next one, reusing their encoder
output and the cross-attention keys and values their first pass made
(:class:`WindowCross`). Beam-search rows (``patience``, at temperature 0) run as a pass of
their own beside the greedy and sampled rows. The windows of word-timestamp jobs are then aligned
(:func:`align_words`: whisper's find_alignment, :mod:`worker.engine.alignment`) before each
job takes its window's result. Each job is charged its share of the wall time of every batch
it was in (metering), and out of memory splits a batch in two and retries each half.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, TypeVar

import torch

from app.jobs.options import BEAM_SIZE
from worker.engine import alignment
from worker.engine.lanes import torch_threads
from worker.engine.longform import JobState, Outcome
from worker.engine.types import Decoded

if TYPE_CHECKING:
    from whisper.model import Whisper
    from whisper.timing import WordTiming
    from whisper.tokenizer import Tokenizer

    from worker.engine.decoding import BatchDecoder
    from worker.engine.stats import EngineStats
    from worker.engine.textdecoder import KVCache

log = logging.getLogger(__name__)
T = TypeVar("T")


class EngineView(Protocol):
    """What a window needs of the engine (:class:`worker.engine.scheduler.Engine`)."""

    model: Whisper
    device: torch.device
    dtype: torch.dtype
    decoder: BatchDecoder
    stats: EngineStats
    encoder_chunk: int | None  # windows per encoder call; None: all at once
    sample_len: int
    decode_threads: int | None
    on_batch: Callable[[int], None] | None
    # word alignment: True: each window alone, re-encoded, as transcribe() (bit for bit on
    # a CPU); False: all rows in one forward on the decode's encoder output
    exact_words: bool
    word_threads: int | None  # torch threads of the alignment (None: the lane's own)

    def suppress_ids(self, tokenizer: Tokenizer, suppress_tokens: str) -> tuple[int, ...]: ...

    def _encode(self, mels: list[torch.Tensor]) -> torch.Tensor: ...


def step_window(engine: EngineView, states: list[JobState]) -> None:
    """The current window of every job in `states`, decoded with fallback, in batches."""
    need = [s for s in states if s.tokenizer is None and s.language is None]
    if need:
        detect_languages(engine, need)
    for s in states:
        if s.tokenizer is None:
            assert s.language is not None
            s.set_language(engine.model, s.language)
    states = [s for s in states if not s.done]
    if not states:
        return
    n_ctx = engine.model.dims.n_text_ctx
    mels = [s.next_window(n_ctx)[0] for s in states]
    engine.stats.add_windows(len(states))

    def encode(idx: list[int]) -> list[torch.Tensor]:
        sub = [states[i] for i in idx]
        feats = charged(
            sub, [1.0] * len(sub), lambda: engine._encode([mels[i] for i in idx]), engine.device
        )
        return list(feats)

    features = with_oom_split(encode, list(range(len(states))), engine.device)
    # temperature fallback: rows still failing re-decode at their next temperature, on the
    # cross-attention keys and values their first pass made
    cross = WindowCross()
    level = [0] * len(states)
    final: list[Decoded | None] = [None] * len(states)
    pending = list(range(len(states)))
    while pending:
        decoded = with_oom_split(
            lambda idx: decode_rows(engine, states, features, cross, level, idx),
            pending,
            engine.device,
        )
        still = []
        for i, d in zip(pending, decoded, strict=True):
            s = states[i]
            if s.needs_fallback(d) and level[i] + 1 < len(s.temps):
                level[i] += 1
                still.append(i)
            else:
                final[i] = d
        pending = still
    outcomes = []
    for s, chosen in zip(states, final, strict=True):
        assert chosen is not None
        start = time.perf_counter()
        outcomes.append(s.cut(chosen))
        s.runtime_s += time.perf_counter() - start
    words = align_words(engine, states, outcomes, mels, features)
    for i, (s, outcome) in enumerate(zip(states, outcomes, strict=True)):
        start = time.perf_counter()
        s.accept(outcome, words.get(i))
        s.runtime_s += time.perf_counter() - start


def align_words(
    engine: EngineView,
    states: list[JobState],
    outcomes: list[Outcome],
    mels: list[torch.Tensor],
    features: list[torch.Tensor],
) -> dict[int, list[WordTiming]]:
    """find_alignment() of the windows whose jobs want word timestamps, by index in
    `states`; each job is charged in proportion to the tokens it aligns."""
    rows = {
        i: row
        for i, (s, o) in enumerate(zip(states, outcomes, strict=True))
        if (row := s.align_row(o)) is not None
    }
    if not rows:
        return {}
    idx = list(rows)
    model = engine.model
    weights = [float(len(rows[i].sequence)) for i in idx]

    def exact() -> list[list[WordTiming]]:
        # one window per forward, as transcribe() aligns it (see worker.engine.alignment)
        out = []
        for i in idx:
            mel = mels[i][None].to(engine.device, engine.dtype)
            out += alignment.find_alignments(model, [rows[i]], alignment.encode(model, mel))
        return out

    def together(sub: list[int]) -> list[list[WordTiming]]:
        audio = torch.stack([features[i] for i in sub])
        return alignment.find_alignments(model, [rows[i] for i in sub], audio)

    start = time.perf_counter()
    with torch_threads(engine.word_threads):
        if engine.exact_words:
            found = charged([states[i] for i in idx], weights, exact, engine.device)
        else:
            found = charged(
                [states[i] for i in idx],
                weights,
                lambda: with_oom_split(together, idx, engine.device),
                engine.device,
            )
    engine.stats.add_words(len(idx), time.perf_counter() - start)
    return dict(zip(idx, found, strict=True))


def encode(engine: EngineView, mels: list[torch.Tensor]) -> torch.Tensor:
    """The encoder over windows, `engine.encoder_chunk` windows per call (None: all)."""
    start = time.perf_counter()
    with torch.inference_mode():
        mel = torch.stack(mels).to(engine.device, engine.dtype)
        chunk = engine.encoder_chunk or len(mels)
        parts = [engine.model.encoder(mel[i : i + chunk]) for i in range(0, len(mels), chunk)]
        features: torch.Tensor = parts[0] if len(parts) == 1 else torch.cat(parts)
    engine.stats.add_encoder(time.perf_counter() - start)
    return features


def detect_languages(engine: EngineView, states: list[JobState]) -> None:
    """Language detection of jobs without a language, batched: on each one's first 30 s."""
    from whisper.tokenizer import get_tokenizer

    model = engine.model
    tokenizer = get_tokenizer(model.is_multilingual, num_languages=model.num_languages)

    def run(idx: list[int]) -> list[str]:
        with torch.inference_mode():
            sub = [states[i] for i in idx]
            ones = [1.0] * len(sub)
            features = charged(
                sub, ones, lambda: engine._encode([s.detection_mel() for s in sub]), engine.device
            )
            _, probs = charged(
                sub, ones, lambda: model.detect_language(features, tokenizer), engine.device
            )
        return [max(p, key=p.get) for p in probs]

    languages = with_oom_split(run, list(range(len(states))), engine.device)
    for s, lang in zip(states, languages, strict=True):
        s.set_language(model, lang)


class WindowCross:
    """The cross-attention keys and values of a window's rows, made by the first pass that
    decodes a row and reused by its fallback rungs (whisper makes them again for each
    rung: they are the same). Kept once that pass has ended: a pass that ran out of memory
    leaves nothing behind for its halves to carry."""

    def __init__(self) -> None:
        self._rows: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # per layer

    def of(self, idx: list[int]) -> KVCache | None:
        """The rows' keys and values, if every one of them has them."""
        if not idx or any(i not in self._rows for i in idx):
            return None
        per_row = [self._rows[i] for i in idx]
        return [
            (torch.stack([r[n][0] for r in per_row]), torch.stack([r[n][1] for r in per_row]))
            for n in range(len(per_row[0]))
        ]

    def keep(self, idx: list[int], cross: KVCache) -> None:
        for j, i in enumerate(idx):
            self._rows[i] = [(k[j], v[j]) for k, v in cross]


def decode_rows(
    engine: EngineView,
    states: list[JobState],
    features: list[torch.Tensor],
    cross: WindowCross,
    level: list[int],
    idx: list[int],
) -> list[Decoded]:
    """One decoding pass per group of rows: beam search (patience, at temperature 0, as
    whisper runs it) and greedy or sampled rows (the rest, fallbacks of beam jobs
    included: whisper samples at t > 0 without beams)."""
    temps = {i: states[i].temps[level[i]] for i in idx}
    beams = [i for i in idx if states[i].opts.patience is not None and temps[i] == 0]
    beam_set = set(beams)
    single = [i for i in idx if i not in beam_set]
    out: dict[int, Decoded] = {}
    for group, beam in ((single, False), (beams, True)):
        if group:
            decoded = decode_group(engine, states, features, cross, temps, group, beam)
            out.update(zip(group, decoded, strict=True))
    return [out[i] for i in idx]


def decode_group(
    engine: EngineView,
    states: list[JobState],
    features: list[torch.Tensor],
    window_cross: WindowCross,
    temps: dict[int, float],
    idx: list[int],
    beam: bool,
) -> list[Decoded]:
    """One decode pass of the rows idx, metered: each job pays for the row-steps it was live."""
    sub = [states[i] for i in idx]
    rows = [
        s.row(temps[i], engine.suppress_ids(s.tok, s.opts.suppress_tokens))
        for s, i in zip(sub, idx, strict=True)
    ]
    start = time.perf_counter()
    with torch_threads(engine.decode_threads):
        cross = window_cross.of(idx)
        first = cross is None
        if cross is None:
            cross = engine.decoder.cross_kv(torch.stack([features[i] for i in idx]))
        if beam:
            results = engine.decoder.decode_beam(
                None,
                rows,
                engine.sample_len,
                BEAM_SIZE,
                [p for s in sub if (p := s.opts.patience) is not None],  # all of them
                [s.opts.length_penalty for s in sub],
                cross=cross,
            )
        else:
            results = engine.decoder.decode(None, rows, engine.sample_len, cross=cross)
        if first:
            window_cross.keep(idx, cross)
    if engine.on_batch is not None:
        engine.on_batch(len(rows))
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)
    wall = time.perf_counter() - start
    rows_per_job = BEAM_SIZE if beam else 1
    row_steps = sum(r.steps for r in results)
    engine.stats.add_pass(
        rows=len(rows) * rows_per_job,
        seconds=wall,
        steps=max((r.steps for r in results), default=0) // rows_per_job,
        row_steps=row_steps,
        beam_jobs=len(rows) if beam else None,
    )
    # metering: a pass's wall time split by the decoder row-steps each job was live
    # (a beam job's steps count once per beam)
    total = row_steps or 1
    out = []
    for s, r, i in zip(sub, results, idx, strict=True):
        s.runtime_s += wall * r.steps / total
        out.append(s.to_decoded(r, temps[i]))
    return out


def charged(
    states: list[JobState], weights: list[float], fn: Callable[[], T], device: torch.device
) -> T:
    """Run fn and charge its wall time to the jobs, in proportion to their weights."""
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - start
    total = sum(weights) or 1.0
    for s, w in zip(states, weights, strict=True):
        s.runtime_s += wall * w / total
    return out


def with_oom_split(
    fn: Callable[[list[int]], list[T]], idx: list[int], device: torch.device
) -> list[T]:
    """Run fn over rows idx; out of memory splits the rows in two and retries each half."""
    try:
        return fn(idx)
    except BaseException as exc:
        if not is_oom(exc) or len(idx) == 1:
            raise
        log.warning("out of memory at %d rows: splitting the batch", len(idx))
        if device.type == "cuda":
            torch.cuda.empty_cache()
        half = len(idx) // 2
        return with_oom_split(fn, idx[:half], device) + with_oom_split(fn, idx[half:], device)


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text
    )
