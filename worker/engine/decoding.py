"""One 30 s window of many jobs decoded as one batch: openai-whisper's ``decode()`` rules as
tensor operations over the batch.

Every row carries its own initial tokens (``sot_prev`` + prompt + ``sot`` sequence), its own
suppressed tokens and its own temperature, so jobs with different options share a batch.
Rows are left-padded to the longest prompt: every row writes its next key/value at the same
cache slot each step (a slice copy, no per-row indexing), padding slots are masked out of
self-attention, and each row's positional embedding counts from its own first real token.

A pass is :meth:`BatchDecoder._prefill` (every row's initial tokens in one decoder call),
then one step loop, :meth:`BatchDecoder._search_loop`, shared by every search: a decoder step
(:meth:`BatchDecoder._step`), whisper's logit filters (:meth:`BatchDecoder._apply_rules`),
then the search's own update, and compaction (finished rows leave the caches) once most rows
are done. The searches (:mod:`worker.engine.searches`): ``Greedy`` (whisper's
``GreedyDecoder``: argmax, or a draw at the row's temperature) behind
:meth:`BatchDecoder.decode`, and ``Beam`` (whisper's ``BeamSearchDecoder`` +
``MaximumLikelihoodRanker``, each job's beams consecutive rows) behind
:meth:`BatchDecoder.decode_beam`. Nothing on the per-step path loops over rows in Python: the
timestamp rules, suppression, sampling and stopping are a fixed number of tensor ops whatever
the batch size (tests/test_engine_ops.py counts them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F  # noqa: N812 (torch's own spelling)
from torch import Tensor

from worker.engine.rows import Prefilled, RowResult, Rows, RowSpec, Search, TimestampState, Vocab
from worker.engine.searches import Beam, Greedy
from worker.engine.textdecoder import KVCache, TextDecoder

if TYPE_CHECKING:
    from whisper.model import Whisper
    from whisper.tokenizer import Tokenizer

# openai-whisper DecodingOptions.max_initial_timestamp default (seconds).
MAX_INITIAL_TIMESTAMP_S = 1.0
# Compact the batch (drop finished rows from the caches) once at most this share is live:
# copying caches every time one row ends would cost more than computing a few dead rows.
COMPACT_BELOW = 0.5
# On a GPU, how many steps the loop runs between reads of how many rows are live: each read
# waits for the device to finish the step, so the host cannot queue the next ones meanwhile.
# A window whose rows all ended runs at most this many steps minus one for nothing. On a CPU
# every step (a read costs nothing there, a wasted step does).
SYNC_EVERY_CUDA = 8
SYNC_EVERY_CPU = 1
# How a decoder step runs: "eager" (TextDecoder.forward: attends the slots written so far),
# "static" (TextDecoder.step_static: the same shapes every step of a pass) or "graph" (the
# static step captured as a CUDA graph per pass and replayed: one launch per step instead of
# a hundred kernels; CUDA only).
STEP_MODES = ("eager", "static", "graph")


def suppress_list(tokenizer: Tokenizer, suppress_tokens: str) -> tuple[int, ...]:
    """whisper.decoding.DecodingTask._get_suppress_tokens, for one option string."""
    ids = [int(t) for t in suppress_tokens.split(",") if t.strip()]
    if -1 in ids:
        ids = [t for t in ids if t >= 0]
        ids.extend(tokenizer.non_speech_tokens)
    ids.extend(
        [
            tokenizer.transcribe,
            tokenizer.translate,
            tokenizer.sot,
            tokenizer.sot_prev,
            tokenizer.sot_lm,
        ]
    )
    if tokenizer.no_speech is not None:
        ids.append(tokenizer.no_speech)
    return tuple(sorted(set(ids)))


class BatchDecoder(TextDecoder):
    """The text decoder plus decoding: whisper's logit filters and searches over a batch of
    rows with their own prompts, suppressed tokens, temperatures and patience."""

    def __init__(self, model: Whisper, dtype: torch.dtype, tokenizer: Tokenizer) -> None:
        super().__init__(model, dtype)
        self.sync_every = SYNC_EVERY_CUDA if self.device.type == "cuda" else SYNC_EVERY_CPU
        precision = 30.0 / model.dims.n_audio_ctx
        self.vocab = Vocab(
            eot=tokenizer.eot,
            timestamp_begin=tokenizer.timestamp_begin,
            no_timestamps=tokenizer.no_timestamps,
            no_speech=tokenizer.no_speech,
            blank=(*tokenizer.encode(" "), tokenizer.eot),
            max_initial_index=round(MAX_INITIAL_TIMESTAMP_S / precision),
        )
        v = self.vocab
        self.ids = torch.arange(model.dims.n_vocab, device=self.device)
        # The first sampled token: SuppressBlank + a timestamp no later than 1 s.
        first = (self.ids < v.timestamp_begin) | (
            self.ids > v.timestamp_begin + v.max_initial_index
        )
        first[list(v.blank)] = True
        self.first_step_mask = first
        self._suppress_cache: dict[tuple[int, ...], Tensor] = {}
        self.step_mode = "eager"

    def set_step_mode(self, mode: str) -> None:
        """How decoder steps run (:data:`STEP_MODES`)."""
        if mode not in STEP_MODES:
            raise ValueError(f"step mode {mode!r}: one of {', '.join(STEP_MODES)}")
        if mode == "graph" and self.device.type != "cuda":
            raise ValueError("step mode 'graph' captures CUDA graphs: a CUDA device only")
        self.step_mode = mode

    def suppress_mask(self, ids: tuple[int, ...]) -> Tensor:
        mask = self._suppress_cache.get(ids)
        if mask is None:
            mask = torch.zeros(self.dims.n_vocab, dtype=torch.bool, device=self.device)
            mask[list(ids)] = True
            if self.vocab.no_timestamps is not None:  # ApplyTimestampRules, unconditionally
                mask[self.vocab.no_timestamps] = True
            self._suppress_cache[ids] = mask
        return mask

    # ------------------------------------------------------------------ one pass

    def _prefill(
        self,
        audio_features: Tensor | None,
        rows: list[RowSpec],
        sample_len: int,
        cross: KVCache | None = None,
    ) -> Prefilled:
        """Every row's initial tokens through the decoder in one call, left-padded to the
        longest: every row then writes its next key/value at the same cache slot each step,
        padding slots are masked out of self-attention (a padding query sees itself only, so
        no softmax row is empty), and each row's positions count from its first real token."""
        v = self.vocab
        dev = self.device
        n = len(rows)
        lengths = [len(r.initial_tokens) for r in rows]
        width = max(lengths)
        slots = width + sample_len
        offsets = [width - n_init for n_init in lengths]

        padded = [
            [v.eot] * off + list(r.initial_tokens) for off, r in zip(offsets, rows, strict=True)
        ]
        init = torch.tensor(padded, dtype=torch.long).to(dev)
        offset_t = torch.tensor(offsets, device=dev)
        cache = self.new_cache(n, slots, zeroed=self.step_mode != "eager")
        if cross is None:
            assert audio_features is not None, "a pass needs its audio or its cross K/V"
            cross = self.cross_kv(audio_features)
        slot_ids = torch.arange(slots, device=dev)
        key_ok = (slot_ids[None, :] >= offset_t[:, None])[:, None, None, :]  # (B,1,1,slots)
        pos = (slot_ids[None, :width] - offset_t[:, None]).clamp(min=0)
        causal = torch.ones(width, width, dtype=torch.bool, device=dev).tril()
        eye = torch.eye(width, dtype=torch.bool, device=dev)
        prefill_mask = (key_ok[..., :width] & causal) | eye
        hidden = self(init, pos, 0, prefill_mask, cache, cross)
        no_speech = [math.nan] * n
        if v.no_speech is not None:
            rows_idx = torch.arange(n, device=dev)
            sot_slots = torch.tensor([offsets[i] + r.sot_index for i, r in enumerate(rows)])
            at_sot = self.logits(hidden[rows_idx, sot_slots.to(dev)])
            no_speech = at_sot.softmax(dim=-1)[:, v.no_speech].tolist()
        return Prefilled(
            width=width,
            # whisper stops a row after sample_len tokens or once its context would overflow
            budget=torch.tensor(
                [min(sample_len, self.n_ctx - n_init + 1) for n_init in lengths], device=dev
            ),
            no_speech=no_speech,
            logits=self.logits(hidden[:, -1]),
            rows=Rows(
                length=torch.tensor(lengths, device=dev),
                key_ok=key_ok,
                suppress=torch.stack([self.suppress_mask(r.suppress) for r in rows]),
                ts=TimestampState.start(n, dev),
                cache=cache,
                cross=cross,
            ),
        )

    def _step(self, tok: Tensor, it: int, width: int, rows: Rows) -> Tensor:
        """Decoder step `it` (from 1: step 0's logits are the prefill's): each row's last
        token in, its key/value written at slot width + it - 1, logits (rows, n_vocab) out."""
        slot = width + it - 1
        pos_t = (rows.length + (it - 1)).clamp(max=self.n_ctx - 1)[:, None]
        hidden = self(
            tok[:, None],
            pos_t,
            slot,
            rows.key_ok[..., : slot + 1],
            rows.cache,
            rows.cross,
            rows.group,
        )
        return self.logits(hidden[:, 0])

    def _apply_rules(self, logits: Tensor, it: int, suppress: Tensor, ts: TimestampState) -> None:
        """SuppressTokens (+ <|notimestamps|>), SuppressBlank and ApplyTimestampRules on the
        logits of step `it`, in place, for every row at once."""
        v = self.vocab
        logits.masked_fill_(suppress, -math.inf)
        if it == 0:
            logits.masked_fill_(self.first_step_mask, -math.inf)
        else:
            # Each rule masks a column range, so it is applied to that slice alone: no
            # (rows, n_vocab) mask is built per step (the timestamps are 1,501 of 51,865).
            tb = v.timestamp_begin
            last, pen = ts.last, ts.pen
            pair_open = last & ~pen  # last token a timestamp, the one before not
            bound = torch.where(pair_open, ts.last_tok, ts.last_tok + 1)
            ts_block = (last & pen)[:, None] | (self.ids[tb:] < bound[:, None])
            logits[:, tb:].masked_fill_(ts_block, -math.inf)
            logits[:, : v.eot].masked_fill_(pair_open[:, None], -math.inf)
        lp = F.log_softmax(logits, dim=-1)
        ts_wins = lp[:, v.timestamp_begin :].logsumexp(dim=-1) > lp[:, : v.timestamp_begin].amax(
            dim=-1
        )
        logits[:, : v.timestamp_begin].masked_fill_(ts_wins[:, None], -math.inf)

    def _search_loop(self, pre: Prefilled, search: Search, sample_len: int) -> None:
        """The step loop of every search: step, filter, update, compact."""
        every = self.sync_every if search.defers_sync else 1
        static = None if self.step_mode == "eager" else StaticSteps(self, pre.width)
        for it in range(sample_len):
            rows = search.rows
            if it == 0:
                logits = pre.logits
            elif static is not None:
                logits = static(search.tok, rows)
            else:
                logits = self._step(search.tok, it, pre.width, rows)
            self._apply_rules(logits, it, rows.suppress, rows.ts)
            search.advance(logits, it)
            if (it + 1) % every:
                continue  # the device runs ahead: nothing here waits for it
            live = search.live_count()
            if live == 0:
                break
            if live <= search.size * COMPACT_BELOW:
                search.compact()

    @torch.inference_mode()
    def decode(
        self,
        audio_features: Tensor | None,  # (B, n_audio_ctx, n_audio_state); None: `cross` given
        rows: list[RowSpec],
        sample_len: int,
        generator: torch.Generator | None = None,
        cross: KVCache | None = None,
    ) -> list[RowResult]:
        """Decode one window per row until every row has sampled EOT or hit its length limit.
        `cross`: the rows' cross-attention keys and values when already made (None: from
        `audio_features`)."""
        pre = self._prefill(audio_features, rows, sample_len, cross)
        search = Greedy(pre, [r.temperature for r in rows], sample_len, self.vocab, generator)
        self._search_loop(pre, search, sample_len)
        return search.results(pre)

    @torch.inference_mode()
    def decode_beam(
        self,
        audio_features: Tensor | None,  # (J, n_audio_ctx, n_audio_state); None: `cross` given
        rows: list[RowSpec],  # one per job (temperature 0)
        sample_len: int,
        beam_size: int,
        patience: list[float],  # per job
        length_penalty: list[float | None] | None = None,  # per job; None: per token
        cross: KVCache | None = None,  # per job, as decode()'s
    ) -> list[RowResult]:
        """openai-whisper's BeamSearchDecoder + MaximumLikelihoodRanker for many jobs at once:
        each job's ``beam_size`` beams are consecutive rows of one batch, and the candidate
        ranking, the finished lists and the beams' reordering are tensor operations over all
        jobs. Per job: each beam proposes its top ``beam_size + 1`` tokens; the candidates,
        sorted by cumulative log-probability (stable: ties keep whisper's beam-then-rank
        order), give the next beams (the best ``beam_size`` without EOT) and the finished
        sequences (those with EOT ranked above the last beam kept), until
        ``round(beam_size * patience)`` are finished or the length limit; the unfinished beams
        then fill up to ``beam_size`` and the best sum of log-probabilities per token wins.
        """
        # A job's beams all start from its initial tokens: prefilled once per job; its row
        # becomes `beam_size` rows after the first step.
        pre = self._prefill(audio_features, rows, sample_len, cross)
        search = Beam(pre, beam_size, patience, sample_len, self.vocab)
        self._search_loop(pre, search, sample_len)
        return search.results(pre, length_penalty or [None] * len(rows))


class StaticSteps:
    """The decoder steps of one pass in a static step mode: the slot the next step writes is
    a device tensor the step itself advances, so nothing the host passes changes from step
    to step. With ``graph``, the step is captured as a CUDA graph for the pass's rows and
    replayed; rows replaced (compaction, a job's row becoming its beams) are captured again.
    The logits returned are the graph's own buffer: the next step overwrites them."""

    def __init__(self, decoder: BatchDecoder, width: int) -> None:
        self.decoder = decoder
        dev = decoder.device
        self.width = torch.tensor(width, device=dev)
        self.slot = torch.tensor(width, device=dev)  # step 1 writes the slot after the prefill
        self.graph = decoder.step_mode == "graph"
        self._captured: _Captured | None = None

    def _run(self, tok: Tensor, rows: Rows) -> Tensor:
        d = self.decoder
        positions = (rows.length + (self.slot - self.width)).clamp(max=d.n_ctx - 1)
        hidden = d.step_static(
            tok, self.slot, positions, rows.key_ok, rows.cache, rows.cross, rows.group
        )
        logits = d.logits(hidden)
        self.slot.add_(1)
        return logits

    def __call__(self, tok: Tensor, rows: Rows) -> Tensor:
        if not self.graph:
            return self._run(tok, rows)
        cap = self._captured
        if cap is None or cap.rows is not rows:
            self._captured = None  # its memory pool goes before the next one is taken
            cap = self._captured = self._capture(tok, rows)
        cap.tok.copy_(tok)
        cap.graph.replay()
        return cap.logits

    def _capture(self, tok: Tensor, rows: Rows) -> _Captured:
        """torch's recipe, without torch.cuda.graph's device sync and cache flush (a pass
        captures at least once): a first call on the capture's stream (lazy kernel and
        workspace set-up), its slot taken back from the counter (the step after writes it
        anyway), then the capture. Capture errors are this thread's own ("thread_local"):
        other threads make jobs' log-mels on the device meanwhile."""
        dev = self.decoder.device
        static_tok = tok.clone()
        main = torch.cuda.current_stream(dev)
        side = torch.cuda.Stream(dev)  # type: ignore[no-untyped-call]
        side.wait_stream(main)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(side):
            self._run(static_tok, rows)
            self.slot.sub_(1)
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                logits = self._run(static_tok, rows)
            finally:
                graph.capture_end()
        main.wait_stream(side)
        return _Captured(rows, static_tok, graph, logits)


@dataclass(frozen=True)
class _Captured:
    rows: Rows
    tok: Tensor
    graph: torch.cuda.CUDAGraph
    logits: Tensor


__all__ = ["BatchDecoder", "RowResult", "RowSpec", "suppress_list"]
