"""One 30 s window of many jobs decoded as one batch: openai-whisper's ``decode()`` rules as
tensor operations over the batch.

Every row carries its own initial tokens (``sot_prev`` + prompt + ``sot`` sequence), its own
suppressed tokens and its own temperature, so jobs with different options share a batch.
Rows are left-padded to the longest prompt: every row writes its next key/value at the same
cache slot each step (a slice copy, no per-row indexing), padding slots are masked out of
self-attention, and each row's positional embedding counts from its own first real token.
Nothing on the per-token path loops over rows in Python: the timestamp rules, suppression,
sampling and stopping are a fixed number of tensor ops whatever the batch size.

Greedy and sampled rows decode in :meth:`BatchDecoder.decode`; beam search (whisper's
``BeamSearchDecoder``, each job's beams as consecutive rows) in
:meth:`BatchDecoder.decode_beam`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F  # noqa: N812 (torch's own spelling)
from torch import Tensor, nn

if TYPE_CHECKING:
    from whisper.model import Whisper
    from whisper.tokenizer import Tokenizer

# openai-whisper DecodingOptions.max_initial_timestamp default (seconds).
MAX_INITIAL_TIMESTAMP_S = 1.0
# Compact the batch (drop finished rows from the caches) once at most this share is live:
# copying caches every time one row ends would cost more than computing a few dead rows.
COMPACT_BELOW = 0.5
# pick_projection(): rows of the probe steps (a CPU window's small and full batches: on the
# Xeon, one thread, MKL took 7.9 ms against oneDNN's 9.0 at 4 rows and 14.3 against 18.2 at
# 16, in a one-off timing on 2026-11-26) and timed calls.
PROJECTION_PROBE_ROWS = (4, 16)
PROJECTION_PROBE_CALLS = 5


@dataclass(frozen=True)
class RowSpec:
    """What one row of a decode pass needs (per job and window; built on the host)."""

    initial_tokens: tuple[int, ...]  # [sot_prev, *prompt]? + sot_sequence
    sot_index: int  # index of <|startoftranscript|> in initial_tokens
    suppress: tuple[int, ...]  # token ids never sampled (whisper's SuppressTokens list)
    temperature: float


@dataclass(frozen=True)
class RowResult:
    tokens: list[int]  # sampled tokens before the first EOT (whisper's DecodingResult.tokens)
    sum_logprob: float
    no_speech_prob: float
    steps: int  # decoder steps this row was live (its share of the pass's compute)


@dataclass(frozen=True)
class _TimestampState:
    """ApplyTimestampRules' view of each row's sampled tokens: whether the last and the one
    before were timestamps, and the last timestamp (-1: none yet)."""

    last: Tensor
    pen: Tensor
    last_tok: Tensor

    @classmethod
    def start(cls, rows: int, device: torch.device) -> _TimestampState:
        yes = torch.ones(rows, dtype=torch.bool, device=device)
        # "fewer than 2 tokens" counts as both being timestamps, as whisper's rule reads it
        return cls(yes, yes, torch.full((rows,), -1, dtype=torch.long, device=device))

    def select(self, idx: Tensor) -> _TimestampState:
        return _TimestampState(self.last[idx], self.pen[idx], self.last_tok[idx])

    def after(self, tok: Tensor, timestamp_begin: int) -> _TimestampState:
        is_ts = tok >= timestamp_begin
        return _TimestampState(is_ts, self.last, torch.where(is_ts, tok, self.last_tok))


@dataclass
class _Prefilled:
    """A pass after its initial tokens went through the decoder."""

    width: int  # cache slots the longest initial tokens take; sampling writes from here
    length: Tensor  # (B,) initial tokens of each row
    budget: Tensor  # (B,) steps each row may take
    suppress: Tensor  # (B, n_vocab) bool
    key_ok: Tensor  # (B, 1, 1, slots) bool: a row's padding slots are never attended
    cache: list[tuple[Tensor, Tensor]]
    cross: list[tuple[Tensor, Tensor]]
    no_speech: list[float]
    logits: Tensor  # (B, n_vocab) at each row's last initial token


@dataclass(frozen=True)
class _Vocab:
    eot: int
    timestamp_begin: int
    no_timestamps: int | None
    no_speech: int | None
    blank: tuple[int, ...]  # SuppressBlank: " " and EOT at the first sampled position
    max_initial_index: int


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


class BatchDecoder(nn.Module):
    """The text decoder of a Whisper model, run over a ragged batch with a preallocated cache.

    It reuses the model's parameters; on CUDA the matrices are cast to fp16 once here (layer
    norms stay fp32, as openai-whisper computes them). ``forward`` is one decoder call
    (prefill or one step), so forward hooks mark steps for benchmarks.
    """

    def __init__(self, model: Whisper, dtype: torch.dtype, tokenizer: Tokenizer) -> None:
        super().__init__()
        dec = model.decoder
        self.dims = model.dims
        self.dtype = dtype
        self.n_head = model.dims.n_text_head
        self.n_ctx = model.dims.n_text_ctx
        self.n_state = model.dims.n_text_state
        self.device = next(model.parameters()).device

        def cast(t: Tensor) -> Tensor:
            return t.detach().to(dtype)

        self.token_embedding = dec.token_embedding.weight.detach()
        self.embed_out = self.token_embedding.to(dtype).t()
        self.positional = dec.positional_embedding.detach()
        self.layers: list[dict[str, Tensor]] = []
        for block in dec.blocks:
            a, c, mlp = block.attn, block.cross_attn, block.mlp
            assert c is not None and block.cross_attn_ln is not None
            self.layers.append(
                {
                    # q, k, v of self-attention as one matmul
                    "qkv_w": cast(torch.cat([a.query.weight, a.key.weight, a.value.weight])),
                    "qkv_b": cast(
                        torch.cat([a.query.bias, torch.zeros_like(a.query.bias), a.value.bias])
                    ),
                    "out_w": cast(a.out.weight),
                    "out_b": cast(a.out.bias),
                    "ln1_w": block.attn_ln.weight.detach(),
                    "ln1_b": block.attn_ln.bias.detach(),
                    "cq_w": cast(c.query.weight),
                    "cq_b": cast(c.query.bias),
                    "ck_w": cast(c.key.weight),
                    "cv_w": cast(c.value.weight),
                    "cv_b": cast(c.value.bias),
                    "cout_w": cast(c.out.weight),
                    "cout_b": cast(c.out.bias),
                    "ln2_w": block.cross_attn_ln.weight.detach(),
                    "ln2_b": block.cross_attn_ln.bias.detach(),
                    "fc1_w": cast(mlp[0].weight),
                    "fc1_b": cast(mlp[0].bias),
                    "fc2_w": cast(mlp[2].weight),
                    "fc2_b": cast(mlp[2].bias),
                    "ln3_w": block.mlp_ln.weight.detach(),
                    "ln3_b": block.mlp_ln.bias.detach(),
                }
            )
        self.ln_w = dec.ln.weight.detach()
        self.ln_b = dec.ln.bias.detach()
        # The vocabulary projection is the largest matmul of a step (51,864 x 384 for tiny). On
        # CPU, torch's fp32 matmul goes to MKL, which on an AMD EPYC ran it at 9.8-10.9 ms for
        # 16 rows against 4.0-4.8 ms through oneDNN, and on an Intel Xeon 5-15 % faster than
        # oneDNN (bench/cpu_choices; max diff 2e-6, argmax equal): pick_projection() measures
        # both on the machine at hand. Other matmuls stay on MKL: oneDNN was not faster there
        # and flipped tokens.
        self._onednn_weight = (
            self.token_embedding.contiguous().to_mkldnn()
            if self.device.type == "cpu"
            and dtype == torch.float32
            and torch.backends.mkldnn.is_available()  # type: ignore[no-untyped-call]
            else None
        )
        self._embed_onednn = self._onednn_weight  # the one logits() uses; None: torch's matmul
        n_vocab = model.dims.n_vocab
        precision = 30.0 / model.dims.n_audio_ctx
        self.vocab = _Vocab(
            eot=tokenizer.eot,
            timestamp_begin=tokenizer.timestamp_begin,
            no_timestamps=tokenizer.no_timestamps,
            no_speech=tokenizer.no_speech,
            blank=(*tokenizer.encode(" "), tokenizer.eot),
            max_initial_index=round(MAX_INITIAL_TIMESTAMP_S / precision),
        )
        v = self.vocab
        ids = torch.arange(n_vocab, device=self.device)
        self.ids = ids
        # The first sampled token: SuppressBlank + a timestamp no later than 1 s.
        first = (ids < v.timestamp_begin) | (ids > v.timestamp_begin + v.max_initial_index)
        first[list(v.blank)] = True
        self.first_step_mask = first
        self._suppress_cache: dict[tuple[int, ...], Tensor] = {}

    # ------------------------------------------------------------------ model pieces

    def _ln(self, x: Tensor, w: Tensor, b: Tensor) -> Tensor:
        # whisper's LayerNorm: computed in fp32, returned in the activation dtype
        if self.dtype == torch.float32:
            return F.layer_norm(x, (self.n_state,), w, b)
        return F.layer_norm(x.float(), (self.n_state,), w, b).to(self.dtype)

    def _heads(self, t: Tensor) -> Tensor:
        return t.view(t.shape[0], t.shape[1], self.n_head, -1).transpose(1, 2)

    def cross_kv(self, audio_features: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Cross-attention keys and values of each layer: once per row and window."""
        xa = audio_features.to(self.dtype)
        return [
            (
                self._heads(F.linear(xa, w["ck_w"])).contiguous(),
                self._heads(F.linear(xa, w["cv_w"], w["cv_b"])).contiguous(),
            )
            for w in self.layers
        ]

    def forward(
        self,
        tokens: Tensor,  # (B, T)
        positions: Tensor,  # (B, T) positional-embedding index of each token
        slot: int,  # cache slot of tokens[:, 0]
        self_mask: Tensor,  # (B, 1, T, slot + T) bool: which keys each query may see
        cache: list[tuple[Tensor, Tensor]],  # per layer (B, H, slots, hd), preallocated
        cross: list[tuple[Tensor, Tensor]],  # per layer (B / group, H, n_audio_ctx, hd)
        group: int = 1,  # consecutive rows that share one window's audio (a job's beams)
    ) -> Tensor:
        """Hidden states (B, T, n_state) after the final layer norm."""
        x = self.token_embedding[tokens] + self.positional[positions]
        if self.dtype != torch.float32:
            x = x.to(self.dtype)
        end = slot + tokens.shape[1]
        for w, (ck, cv), (xk, xv) in zip(self.layers, cache, cross, strict=True):
            h = self._ln(x, w["ln1_w"], w["ln1_b"])
            qkv = F.linear(h, w["qkv_w"], w["qkv_b"])
            q, k, v = torch.split(qkv, self.n_state, dim=-1)
            ck[:, :, slot:end] = self._heads(k)
            cv[:, :, slot:end] = self._heads(v)
            a = F.scaled_dot_product_attention(
                self._heads(q), ck[:, :, :end], cv[:, :, :end], attn_mask=self_mask
            )
            x = x + F.linear(a.transpose(1, 2).flatten(2), w["out_w"], w["out_b"])
            h = self._ln(x, w["ln2_w"], w["ln2_b"])
            a = self._cross_attention(self._heads(F.linear(h, w["cq_w"], w["cq_b"])), xk, xv, group)
            x = x + F.linear(a.transpose(1, 2).flatten(2), w["cout_w"], w["cout_b"])
            h = self._ln(x, w["ln3_w"], w["ln3_b"])
            x = x + F.linear(F.gelu(F.linear(h, w["fc1_w"], w["fc1_b"])), w["fc2_w"], w["fc2_b"])
        out: Tensor = self._ln(x, self.ln_w, self.ln_b)
        return out

    @staticmethod
    def _cross_attention(q: Tensor, xk: Tensor, xv: Tensor, group: int) -> Tensor:
        """Cross-attention of (B, H, T, hd) queries. A group's rows attend to one audio: their
        queries go in as extra positions of it, so a job's beams share its keys and values
        instead of holding a copy each (18 MB per row for tiny in fp32)."""
        if group == 1:
            return F.scaled_dot_product_attention(q, xk, xv)
        rows, heads, t, hd = q.shape
        jobs = rows // group
        q = q.view(jobs, group, heads, t, hd).transpose(1, 2).reshape(jobs, heads, group * t, hd)
        a = F.scaled_dot_product_attention(q, xk, xv)
        return a.view(jobs, heads, group, t, hd).transpose(1, 2).reshape(rows, heads, t, hd)

    def logits(self, hidden: Tensor) -> Tensor:
        """(rows, n_state) -> (rows, n_vocab) in fp32, as whisper's ``x @ embedding.T``."""
        if self._embed_onednn is not None:
            out: Tensor = torch._C._nn.mkldnn_linear(
                hidden.contiguous().to_mkldnn(), self._embed_onednn, None
            ).to_dense()
            return out
        dense: Tensor = (hidden @ self.embed_out).float()
        return dense

    def pick_projection(self, rows: tuple[int, ...] = PROJECTION_PROBE_ROWS) -> str:
        """Time the vocabulary projection of steps of `rows` rows both ways, on this thread's
        torch threads, and keep the faster in total: "onednn" or "torch" (the only one off a
        CPU)."""
        if self._onednn_weight is None:
            return "torch"
        gen = torch.Generator().manual_seed(0)
        probes = [torch.randn(n, self.n_state, generator=gen) for n in rows]
        timings = {}
        for name, weight in (("torch", None), ("onednn", self._onednn_weight)):
            self._embed_onednn = weight
            for hidden in probes:  # first calls: packing, allocator
                self.logits(hidden)
            start = time.perf_counter()
            for _ in range(PROJECTION_PROBE_CALLS):
                for hidden in probes:
                    self.logits(hidden)
            timings[name] = time.perf_counter() - start
        choice = min(timings, key=lambda name: timings[name])
        self._embed_onednn = self._onednn_weight if choice == "onednn" else None
        return choice

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

    def _new_cache(self, rows: int, slots: int) -> list[tuple[Tensor, Tensor]]:
        shape = (rows, self.n_head, slots, self.n_state // self.n_head)
        return [
            (
                torch.empty(shape, dtype=self.dtype, device=self.device),
                torch.empty(shape, dtype=self.dtype, device=self.device),
            )
            for _ in self.layers
        ]

    def _prefill(self, audio_features: Tensor, rows: list[RowSpec], sample_len: int) -> _Prefilled:
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

        init = torch.full((n, width), v.eot, dtype=torch.long)
        for i, r in enumerate(rows):
            init[i, offsets[i] :] = torch.tensor(r.initial_tokens)
        init = init.to(dev)
        offset_t = torch.tensor(offsets, device=dev)
        cache = self._new_cache(n, slots)
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
        return _Prefilled(
            width=width,
            length=torch.tensor(lengths, device=dev),
            # whisper stops a row after sample_len tokens or once its context would overflow
            budget=torch.tensor(
                [min(sample_len, self.n_ctx - n_init + 1) for n_init in lengths], device=dev
            ),
            suppress=torch.stack([self.suppress_mask(r.suppress) for r in rows]),
            key_ok=key_ok,
            cache=cache,
            cross=cross,
            no_speech=no_speech,
            logits=self.logits(hidden[:, -1]),
        )

    def _apply_rules(self, logits: Tensor, it: int, suppress: Tensor, ts: _TimestampState) -> None:
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

    @torch.inference_mode()
    def decode(
        self,
        audio_features: Tensor,  # (B, n_audio_ctx, n_audio_state), already encoded
        rows: list[RowSpec],
        sample_len: int,
        generator: torch.Generator | None = None,
    ) -> list[RowResult]:
        """Decode one window per row until every row has sampled EOT or hit its length limit."""
        v = self.vocab
        dev = self.device
        n = len(rows)
        pre = self._prefill(audio_features, rows, sample_len)
        width, cache, cross, logits = pre.width, pre.cache, pre.cross, pre.logits
        temps = torch.tensor([r.temperature for r in rows], device=dev)
        sampled_rows = any(r.temperature > 0 for r in rows)
        safe_temps = torch.where(temps > 0, temps, torch.ones_like(temps))[:, None]
        ts = _TimestampState.start(n, dev)

        # per-row state, compacted together when rows finish
        state: dict[str, Tensor] = {
            "rows": torch.arange(n, device=dev),
            "length": pre.length,
            "budget": pre.budget,
            "temps": temps,
            "safe_temps": safe_temps,
            "suppress": pre.suppress,
            "key_ok": pre.key_ok,
            "sum_lp": torch.zeros(n, device=dev),
            "live": torch.ones(n, dtype=torch.bool, device=dev),
            "steps": torch.zeros(n, dtype=torch.long, device=dev),
        }
        out_tokens = torch.full((n, sample_len), v.eot, dtype=torch.long, device=dev)
        final_sum = torch.zeros(n, device=dev)
        final_steps = torch.zeros(n, dtype=torch.long, device=dev)
        batch = n

        for it in range(sample_len):
            s = state
            if it > 0:
                tok = s["tok"]
                slot = width + it - 1
                pos_t = (s["length"] + (it - 1)).clamp(max=self.n_ctx - 1)[:, None]
                hidden = self(tok[:, None], pos_t, slot, s["key_ok"][..., : slot + 1], cache, cross)
                logits = self.logits(hidden[:, 0])
            self._apply_rules(logits, it, s["suppress"], ts)

            # GreedyDecoder.update: argmax, or a sample at the row's temperature (Gumbel-max
            # is an exact draw from Categorical(logits / T))
            nxt = logits.argmax(dim=-1)
            if sampled_rows:
                u = torch.rand(logits.shape, device=dev, generator=generator)
                drawn = (logits / s["safe_temps"] - torch.log(-torch.log(u))).argmax(dim=-1)
                nxt = torch.where(s["temps"] > 0, drawn, nxt)
            lp = F.log_softmax(logits, dim=-1)
            live = s["live"]
            s["sum_lp"] = s["sum_lp"] + lp.gather(1, nxt[:, None])[:, 0] * live
            s["steps"] = s["steps"] + live
            out_tokens[s["rows"], it] = torch.where(live, nxt, v.eot)
            ts = ts.after(nxt, v.timestamp_begin)
            s["live"] = live & (nxt != v.eot) & (s["budget"] > it + 1)
            s["tok"] = nxt
            n_live = int(s["live"].sum())
            if n_live == 0:
                break
            if n_live <= batch * COMPACT_BELOW:
                final_sum[s["rows"]] = s["sum_lp"]
                final_steps[s["rows"]] = s["steps"]
                keep = s["live"].nonzero()[:, 0]
                state = {k: t.index_select(0, keep) for k, t in s.items()}
                ts = ts.select(keep)
                cache = [(k.index_select(0, keep), vv.index_select(0, keep)) for k, vv in cache]
                cross = [(k.index_select(0, keep), vv.index_select(0, keep)) for k, vv in cross]
                batch = n_live
        final_sum[state["rows"]] = state["sum_lp"]
        final_steps[state["rows"]] = state["steps"]

        results = []
        for i, toks in enumerate(out_tokens.tolist()):
            cut = toks.index(v.eot) if v.eot in toks else len(toks)
            results.append(
                RowResult(
                    tokens=toks[:cut],
                    sum_logprob=float(final_sum[i]),
                    no_speech_prob=pre.no_speech[i],
                    steps=int(final_steps[i]),
                )
            )
        return results

    @torch.inference_mode()
    def decode_beam(
        self,
        audio_features: Tensor,  # (J, n_audio_ctx, n_audio_state), one window per job
        rows: list[RowSpec],  # one per job (temperature 0)
        sample_len: int,
        beam_size: int,
        patience: list[float],  # per job
        length_penalty: list[float | None] | None = None,  # per job; None: per token
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
        v = self.vocab
        dev = self.device
        n = len(rows)
        beam, cands = beam_size, beam_size + 1
        # A job's beams all start from its initial tokens: prefilled once per job, copied.
        pre = self._prefill(audio_features, rows, sample_len)
        width, cross = pre.width, pre.cross
        per_row = torch.arange(n, device=dev).repeat_interleave(beam)
        cache = [(k.index_select(0, per_row), vv.index_select(0, per_row)) for k, vv in pre.cache]
        row_len = pre.length[per_row]
        key_ok = pre.key_ok[per_row]
        suppress = pre.suppress[per_row]
        max_cand = torch.tensor([round(beam * p) for p in patience], device=dev)
        if bool((max_cand < 1).any()):
            raise ValueError(f"patience {patience} leaves no candidates for a beam of {beam}")
        cap = max(beam, int(max_cand.max()))
        # Finished sequences per job, in whisper's dict order: sampled tokens (EOT-padded),
        # their count and their sum of log-probabilities.
        fin_tok = torch.full((n, cap, sample_len), v.eot, dtype=torch.long, device=dev)
        fin_len = torch.zeros((n, cap), dtype=torch.long, device=dev)
        fin_lp = torch.full((n, cap), -math.inf, device=dev)
        n_fin = torch.zeros(n, dtype=torch.long, device=dev)  # by job index, as max_cand
        # Per job, compacted together once enough jobs are done: its index in this pass.
        job = torch.arange(n, device=dev)
        budget = pre.budget
        steps = torch.zeros(n, dtype=torch.long, device=dev)  # by job index, never compacted
        active = torch.ones(n, dtype=torch.bool, device=dev)
        # Per beam row: its tokens so far, its sum of log-probabilities, timestamp state.
        hist = torch.full((n * beam, sample_len), v.eot, dtype=torch.long, device=dev)
        sum_lp = torch.zeros(n * beam, device=dev)
        ts = _TimestampState.start(n, dev)  # one row per job until the first step's beams
        beam_ids = torch.arange(beam, device=dev)
        jobs_now = n
        tok = torch.empty(0, dtype=torch.long, device=dev)  # fed from the second step on

        for it in range(sample_len):
            if it == 0:
                # the beams are still one row per job: its candidates are its top tokens
                logits = pre.logits
                self._apply_rules(logits, 0, pre.suppress, ts)
                lp = F.log_softmax(logits, dim=-1)
                score, cand_tok = lp.topk(cands, dim=-1)  # sorted, as whisper's dict order
                cand_beam = torch.zeros_like(cand_tok)
            else:
                slot = width + it - 1
                pos_t = (row_len + (it - 1)).clamp(max=self.n_ctx - 1)[:, None]
                hidden = self(
                    tok[:, None], pos_t, slot, key_ok[..., : slot + 1], cache, cross, beam
                )
                logits = self.logits(hidden[:, 0])
                self._apply_rules(logits, it, suppress, ts)
                lp = F.log_softmax(logits, dim=-1)
                top_lp, top_tok = lp.topk(cands, dim=-1)  # (rows, cands)
                flat = (sum_lp[:, None] + top_lp).view(jobs_now, beam * cands)
                score, order = flat.sort(dim=-1, descending=True, stable=True)
                cand_tok = top_tok.view(jobs_now, -1).gather(1, order)
                cand_beam = order // cands
            # The next beams: the first `beam` candidates without EOT. An EOT candidate
            # ranked above the last of them is a finished sequence.
            not_eot = cand_tok != v.eot
            before = not_eot.cumsum(dim=-1) - not_eot.long()
            in_reach = before < beam
            pos = torch.arange(score.shape[1], device=dev).expand_as(score)
            keys = torch.where(not_eot & in_reach, pos, pos + score.shape[1])
            pick = keys.topk(beam, dim=-1, largest=False).indices  # in rank order
            src = torch.arange(jobs_now, device=dev)[:, None] * beam + cand_beam.gather(1, pick)
            src = src.view(-1)
            new_tok = cand_tok.gather(1, pick).view(-1)
            new_lp = score.gather(1, pick).view(-1)

            finished = ~not_eot & in_reach & active[:, None]
            rank = finished.cumsum(dim=-1) - 1
            n_fin_now = n_fin[job]
            keep = finished & (n_fin_now[:, None] + rank < max_cand[job][:, None])
            jl, c = keep.nonzero(as_tuple=True)
            if len(jl):
                at = job[jl]
                slot_of = n_fin_now[jl] + rank[jl, c]
                row_of = jl * beam + cand_beam[jl, c] if it > 0 else jl * beam
                fin_tok[at, slot_of, :it] = hist[row_of, :it]
                fin_len[at, slot_of] = it
                fin_lp[at, slot_of] = score[jl, c]
                n_fin.index_add_(0, job, keep.sum(dim=-1))

            # The beams move on: rows take their source's history, cache and timestamp state
            # (the prefix slots are the same for every beam of a job and stay).
            if it == 0:
                ts = ts.select(per_row)
            else:
                hist = hist.index_select(0, src)
                ts = ts.select(src)
                end = width + it
                for k, vv in cache:
                    k[:, :, width:end] = k[:, :, width:end].index_select(0, src)
                    vv[:, :, width:end] = vv[:, :, width:end].index_select(0, src)
            hist[:, it] = new_tok
            ts = ts.after(new_tok, v.timestamp_begin)
            sum_lp = new_lp
            tok = new_tok
            steps.index_add_(0, job, active.long())

            n_fin_now = n_fin[job]
            done = active & ((n_fin_now >= max_cand[job]) | (budget <= it + 1))
            if bool(done.any()):
                # finalize: unfinished beams, best first, fill the job's list up to `beam`
                ranked = sum_lp.view(jobs_now, beam).sort(dim=-1, descending=True, stable=True)
                need = (beam - n_fin_now).clamp(min=0)
                fill = done[:, None] & (beam_ids[None, :] < need[:, None])
                jl, k = fill.nonzero(as_tuple=True)
                if len(jl):
                    at = job[jl]
                    slot_of = n_fin_now[jl] + k
                    row_of = jl * beam + ranked.indices[jl, k]
                    fin_tok[at, slot_of, : it + 1] = hist[row_of, : it + 1]
                    fin_len[at, slot_of] = it + 1
                    fin_lp[at, slot_of] = ranked.values[jl, k]
                    n_fin.index_add_(0, job, fill.sum(dim=-1))
                active = active & ~done
                n_live = int(active.sum())
                if n_live == 0:
                    break
                if n_live <= jobs_now * COMPACT_BELOW:
                    keep_jobs = active.nonzero()[:, 0]
                    keep_rows = (keep_jobs[:, None] * beam + beam_ids).view(-1)
                    job, budget, active = (
                        t.index_select(0, keep_jobs) for t in (job, budget, active)
                    )
                    hist, sum_lp, tok = (t.index_select(0, keep_rows) for t in (hist, sum_lp, tok))
                    row_len, key_ok, suppress = (
                        t.index_select(0, keep_rows) for t in (row_len, key_ok, suppress)
                    )
                    ts = ts.select(keep_rows)
                    cache = [
                        (k.index_select(0, keep_rows), vv.index_select(0, keep_rows))
                        for k, vv in cache
                    ]
                    cross = [
                        (k.index_select(0, keep_jobs), vv.index_select(0, keep_jobs))
                        for k, vv in cross
                    ]
                    jobs_now = n_live
        # MaximumLikelihoodRanker: the best sum of log-probabilities per sampled token, or
        # over Google NMT's length penalty ((5 + length) / 6) ** alpha, in float64 as whisper
        # divides; the first of equals wins (np.argmax).
        lens, lps = fin_len.tolist(), fin_lp.double().tolist()
        alphas = length_penalty or [None] * n
        results = []
        for j, (n_j, lens_j, lps_j) in enumerate(zip(n_fin.tolist(), lens, lps, strict=True)):
            best = max(range(n_j), key=lambda c: (_ranked(lps_j[c], lens_j[c], alphas[j]), -c))
            results.append(
                RowResult(
                    tokens=fin_tok[j, best, : lens_j[best]].tolist(),
                    sum_logprob=lps_j[best],
                    no_speech_prob=pre.no_speech[j],
                    steps=int(steps[j]) * beam,
                )
            )
        return results


def _ranked(sum_logprob: float, length: int, alpha: float | None) -> float:
    """MaximumLikelihoodRanker's score of one finished sequence."""
    if alpha is None:
        return sum_logprob / max(length, 1)
    return float(sum_logprob / ((5 + length) / 6) ** alpha)
