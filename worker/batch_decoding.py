"""One 30 s window of many jobs decoded as one batch: openai-whisper's ``decode()`` rules as
tensor operations over the batch.

Every row carries its own initial tokens (``sot_prev`` + prompt + ``sot`` sequence), its own
suppressed tokens and its own temperature, so jobs with different options share a batch.
Rows are left-padded to the longest prompt: every row writes its next key/value at the same
cache slot each step (a slice copy, no per-row indexing), padding slots are masked out of
self-attention, and each row's positional embedding counts from its own first real token.
Nothing on the per-token path loops over rows in Python: the timestamp rules, suppression,
sampling and stopping are a fixed number of tensor ops whatever the batch size.

Greedy and sampled decoding only. Beam search keeps openai-whisper's own decoder (see
:mod:`worker.engine`).
"""

from __future__ import annotations

import math
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
        # CPU, torch's fp32 matmul goes to MKL, which on this project's AMD EPYC ran it at
        # 9.8-10.9 ms for 16 rows against 4.0-4.8 ms through oneDNN (max diff 2e-6; engine
        # alone on 64 files: decode passes 19.0 -> 15.3 s, texts unchanged; bench/cpu_choices).
        # Other matmuls stay on MKL: oneDNN was not faster there and flipped tokens.
        self._embed_onednn = (
            self.token_embedding.contiguous().to_mkldnn()
            if self.device.type == "cpu"
            and dtype == torch.float32
            and torch.backends.mkldnn.is_available()  # type: ignore[no-untyped-call]
            else None
        )
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
        self.is_ts = ids >= v.timestamp_begin
        self.is_text = ids < v.eot  # "normal text tokens" of ApplyTimestampRules
        self.below_ts = ids < v.timestamp_begin
        # The first sampled token: SuppressBlank + a timestamp no later than 1 s.
        first = self.below_ts | (ids > v.timestamp_begin + v.max_initial_index)
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
        cross: list[tuple[Tensor, Tensor]],
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
            a = F.scaled_dot_product_attention(
                self._heads(F.linear(h, w["cq_w"], w["cq_b"])), xk, xv
            )
            x = x + F.linear(a.transpose(1, 2).flatten(2), w["cout_w"], w["cout_b"])
            h = self._ln(x, w["ln3_w"], w["ln3_b"])
            x = x + F.linear(F.gelu(F.linear(h, w["fc1_w"], w["fc1_b"])), w["fc2_w"], w["fc2_b"])
        out: Tensor = self._ln(x, self.ln_w, self.ln_b)
        return out

    def logits(self, hidden: Tensor) -> Tensor:
        """(rows, n_state) -> (rows, n_vocab) in fp32, as whisper's ``x @ embedding.T``."""
        if self._embed_onednn is not None:
            out: Tensor = torch._C._nn.mkldnn_linear(
                hidden.contiguous().to_mkldnn(), self._embed_onednn, None
            ).to_dense()
            return out
        dense: Tensor = (hidden @ self.embed_out).float()
        return dense

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
        lengths = [len(r.initial_tokens) for r in rows]
        width = max(lengths)
        slots = width + sample_len
        offsets = [width - n_init for n_init in lengths]

        init = torch.full((n, width), v.eot, dtype=torch.long)
        for i, r in enumerate(rows):
            init[i, offsets[i] :] = torch.tensor(r.initial_tokens)
        init = init.to(dev)
        offset_t = torch.tensor(offsets, device=dev)
        length_t = torch.tensor(lengths, device=dev)
        # whisper stops a row after sample_len tokens or once its context would overflow.
        budget = torch.tensor(
            [min(sample_len, self.n_ctx - n_init + 1) for n_init in lengths], device=dev
        )
        temps = torch.tensor([r.temperature for r in rows], device=dev)
        sampled_rows = any(r.temperature > 0 for r in rows)
        safe_temps = torch.where(temps > 0, temps, torch.ones_like(temps))[:, None]
        suppress = torch.stack([self.suppress_mask(r.suppress) for r in rows])

        head_dim = self.n_state // self.n_head
        cache = [
            (
                torch.empty(n, self.n_head, slots, head_dim, dtype=self.dtype, device=dev),
                torch.empty(n, self.n_head, slots, head_dim, dtype=self.dtype, device=dev),
            )
            for _ in self.layers
        ]
        cross = self.cross_kv(audio_features)
        slot_ids = torch.arange(slots, device=dev)
        key_ok = (slot_ids[None, :] >= offset_t[:, None])[:, None, None, :]  # (B,1,1,slots)

        # ---- prefill: all initial tokens, causal, padding keys masked (a padding query
        # sees itself only, so no softmax row is empty)
        pos = (slot_ids[None, :width] - offset_t[:, None]).clamp(min=0)
        causal = torch.ones(width, width, dtype=torch.bool, device=dev).tril()
        eye = torch.eye(width, dtype=torch.bool, device=dev)
        prefill_mask = (key_ok[..., :width] & causal) | eye
        hidden = self(init, pos, 0, prefill_mask, cache, cross)
        rows_idx = torch.arange(n, device=dev)
        no_speech = [math.nan] * n
        if v.no_speech is not None:
            sot_slots = torch.tensor([offsets[i] + r.sot_index for i, r in enumerate(rows)])
            at_sot = self.logits(hidden[rows_idx, sot_slots.to(dev)])
            no_speech = at_sot.softmax(dim=-1)[:, v.no_speech].tolist()
        logits = self.logits(hidden[:, -1])

        # per-row state, compacted together when rows finish
        state: dict[str, Tensor] = {
            "rows": rows_idx,
            "length": length_t,
            "budget": budget,
            "temps": temps,
            "safe_temps": safe_temps,
            "suppress": suppress,
            "key_ok": key_ok,
            "sum_lp": torch.zeros(n, device=dev),
            "live": torch.ones(n, dtype=torch.bool, device=dev),
            "steps": torch.zeros(n, dtype=torch.long, device=dev),
            # ApplyTimestampRules' view of the sampled tokens so far
            "last_ts": torch.ones(n, dtype=torch.bool, device=dev),  # as if "fewer than 2"
            "pen_ts": torch.ones(n, dtype=torch.bool, device=dev),
            "last_ts_tok": torch.full((n,), -1, dtype=torch.long, device=dev),
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
            # SuppressTokens (+ <|notimestamps|>), then the timestamp rules
            logits.masked_fill_(s["suppress"], -math.inf)
            if it == 0:
                logits.masked_fill_(self.first_step_mask, -math.inf)
            else:
                last, pen = s["last_ts"], s["pen_ts"]
                pair_open = last & ~pen  # last token a timestamp, the one before not
                bound = torch.where(pair_open, s["last_ts_tok"], s["last_ts_tok"] + 1)
                ts_block = self.is_ts & ((last & pen)[:, None] | (self.ids < bound[:, None]))
                logits.masked_fill_(ts_block | (self.is_text & pair_open[:, None]), -math.inf)
            lp = F.log_softmax(logits, dim=-1)
            ts_wins = lp[:, v.timestamp_begin :].logsumexp(dim=-1) > lp[
                :, : v.timestamp_begin
            ].amax(dim=-1)
            logits.masked_fill_(self.below_ts & ts_wins[:, None], -math.inf)

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
            is_ts = nxt >= v.timestamp_begin
            s["pen_ts"] = s["last_ts"]
            s["last_ts"] = is_ts
            s["last_ts_tok"] = torch.where(is_ts, nxt, s["last_ts_tok"])
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
                    no_speech_prob=no_speech[i],
                    steps=int(final_steps[i]),
                )
            )
        return results
