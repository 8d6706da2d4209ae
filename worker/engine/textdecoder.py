"""Whisper's text decoder as the batched engine runs it: the model's own parameters, one
preallocated key/value cache per pass, rows of different prompt lengths in one call.

:class:`TextDecoder` is the arithmetic of ``whisper.model.TextDecoder`` (self-attention over
the cache, cross-attention to the window's audio, MLP, final layer norm) and the vocabulary
projection; what decoding does with the logits is :mod:`worker.engine.decoding`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F  # noqa: N812 (torch's own spelling)
from torch import Tensor, nn

if TYPE_CHECKING:
    from whisper.model import ResidualAttentionBlock, Whisper

# pick_projection(): rows of the probe steps (a CPU window's small and full batches: on the
# Xeon, one thread, MKL took 7.9 ms against oneDNN's 9.0 at 4 rows and 14.3 against 18.2 at
# 16, in a one-off timing on 2026-11-26) and timed calls.
PROJECTION_PROBE_ROWS = (4, 16)
PROJECTION_PROBE_CALLS = 5

KVCache = list[tuple[Tensor, Tensor]]  # per layer (rows, heads, slots, head dim): keys, values


@dataclass(frozen=True)
class _Layer:
    """One residual attention block's weights, matrices in the decoding dtype (layer norms
    stay fp32, as openai-whisper computes them)."""

    qkv_w: Tensor  # q, k, v of self-attention as one matmul
    qkv_b: Tensor
    out_w: Tensor
    out_b: Tensor
    ln1_w: Tensor
    ln1_b: Tensor
    cq_w: Tensor  # cross-attention
    cq_b: Tensor
    ck_w: Tensor
    cv_w: Tensor
    cv_b: Tensor
    cout_w: Tensor
    cout_b: Tensor
    ln2_w: Tensor
    ln2_b: Tensor
    fc1_w: Tensor  # MLP
    fc1_b: Tensor
    fc2_w: Tensor
    fc2_b: Tensor
    ln3_w: Tensor
    ln3_b: Tensor

    @classmethod
    def of(cls, block: ResidualAttentionBlock, dtype: torch.dtype) -> _Layer:
        def cast(t: Tensor) -> Tensor:
            return t.detach().to(dtype)

        a, c, mlp = block.attn, block.cross_attn, block.mlp
        assert c is not None and block.cross_attn_ln is not None
        return cls(
            qkv_w=cast(torch.cat([a.query.weight, a.key.weight, a.value.weight])),
            qkv_b=cast(torch.cat([a.query.bias, torch.zeros_like(a.query.bias), a.value.bias])),
            out_w=cast(a.out.weight),
            out_b=cast(a.out.bias),
            ln1_w=block.attn_ln.weight.detach(),
            ln1_b=block.attn_ln.bias.detach(),
            cq_w=cast(c.query.weight),
            cq_b=cast(c.query.bias),
            ck_w=cast(c.key.weight),
            cv_w=cast(c.value.weight),
            cv_b=cast(c.value.bias),
            cout_w=cast(c.out.weight),
            cout_b=cast(c.out.bias),
            ln2_w=block.cross_attn_ln.weight.detach(),
            ln2_b=block.cross_attn_ln.bias.detach(),
            fc1_w=cast(mlp[0].weight),
            fc1_b=cast(mlp[0].bias),
            fc2_w=cast(mlp[2].weight),
            fc2_b=cast(mlp[2].bias),
            ln3_w=block.mlp_ln.weight.detach(),
            ln3_b=block.mlp_ln.bias.detach(),
        )


class TextDecoder(nn.Module):
    """The text decoder of a Whisper model, run over a ragged batch with a preallocated cache.

    It reuses the model's parameters; on CUDA the matrices are cast to fp16 once here (layer
    norms stay fp32, as openai-whisper computes them). ``forward`` is one decoder call
    (prefill or one step), so forward hooks mark steps for benchmarks.
    """

    def __init__(self, model: Whisper, dtype: torch.dtype) -> None:
        super().__init__()
        dec = model.decoder
        self.dims = model.dims
        self.dtype = dtype
        self.n_head = model.dims.n_text_head
        self.n_ctx = model.dims.n_text_ctx
        self.n_state = model.dims.n_text_state
        self.device = next(model.parameters()).device
        self.token_embedding = dec.token_embedding.weight.detach()
        self.embed_out = self.token_embedding.to(dtype).t()
        self.positional = dec.positional_embedding.detach()
        self.layers = [_Layer.of(block, dtype) for block in dec.blocks]
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

    def _ln(self, x: Tensor, w: Tensor, b: Tensor) -> Tensor:
        # whisper's LayerNorm: computed in fp32, returned in the activation dtype
        if self.dtype == torch.float32:
            return F.layer_norm(x, (self.n_state,), w, b)
        return F.layer_norm(x.float(), (self.n_state,), w, b).to(self.dtype)

    def _heads(self, t: Tensor) -> Tensor:
        return t.view(t.shape[0], t.shape[1], self.n_head, -1).transpose(1, 2)

    def new_cache(self, rows: int, slots: int, *, zeroed: bool = False) -> KVCache:
        """Self-attention keys and values of every layer; ``zeroed`` for :meth:`step_static`,
        which reads slots not yet written (masked out, but a NaN left in memory would still
        turn its weight 0 times the value into NaN)."""
        shape = (rows, self.n_head, slots, self.n_state // self.n_head)
        new = torch.zeros if zeroed else torch.empty
        return [
            (
                new(shape, dtype=self.dtype, device=self.device),
                new(shape, dtype=self.dtype, device=self.device),
            )
            for _ in self.layers
        ]

    def cross_kv(self, audio_features: Tensor) -> KVCache:
        """Cross-attention keys and values of each layer: once per row and window."""
        xa = audio_features.to(self.dtype)
        return [
            (
                self._heads(F.linear(xa, w.ck_w)).contiguous(),
                self._heads(F.linear(xa, w.cv_w, w.cv_b)).contiguous(),
            )
            for w in self.layers
        ]

    def forward(
        self,
        tokens: Tensor,  # (B, T)
        positions: Tensor,  # (B, T) positional-embedding index of each token
        slot: int,  # cache slot of tokens[:, 0]
        self_mask: Tensor,  # (B, 1, T, slot + T) bool: which keys each query may see
        cache: KVCache,  # per layer (B, H, slots, hd), preallocated
        cross: KVCache,  # per layer (B / group, H, n_audio_ctx, hd)
        group: int = 1,  # consecutive rows that share one window's audio (a job's beams)
    ) -> Tensor:
        """Hidden states (B, T, n_state) after the final layer norm."""
        x = self.token_embedding[tokens] + self.positional[positions]
        if self.dtype != torch.float32:
            x = x.to(self.dtype)
        end = slot + tokens.shape[1]
        for w, (ck, cv), (xk, xv) in zip(self.layers, cache, cross, strict=True):
            q, k, v = self._qkv(x, w)
            ck[:, :, slot:end] = k
            cv[:, :, slot:end] = v
            a = F.scaled_dot_product_attention(
                q, ck[:, :, :end], cv[:, :, :end], attn_mask=self_mask
            )
            x = self._rest_of_block(x, a, w, xk, xv, group)
        out: Tensor = self._ln(x, self.ln_w, self.ln_b)
        return out

    def _qkv(self, x: Tensor, w: _Layer) -> tuple[Tensor, Tensor, Tensor]:
        """A block's self-attention queries, keys and values, split into heads."""
        qkv = F.linear(self._ln(x, w.ln1_w, w.ln1_b), w.qkv_w, w.qkv_b)
        q, k, v = torch.split(qkv, self.n_state, dim=-1)
        return self._heads(q), self._heads(k), self._heads(v)

    def _rest_of_block(
        self, x: Tensor, a: Tensor, w: _Layer, xk: Tensor, xv: Tensor, group: int
    ) -> Tensor:
        """A block after its self-attention `a`: the output projection, cross-attention and
        the MLP, each added to the residual stream."""
        x = x + F.linear(a.transpose(1, 2).flatten(2), w.out_w, w.out_b)
        h = self._ln(x, w.ln2_w, w.ln2_b)
        a = self._cross_attention(self._heads(F.linear(h, w.cq_w, w.cq_b)), xk, xv, group)
        x = x + F.linear(a.transpose(1, 2).flatten(2), w.cout_w, w.cout_b)
        h = self._ln(x, w.ln3_w, w.ln3_b)
        return x + F.linear(F.gelu(F.linear(h, w.fc1_w, w.fc1_b)), w.fc2_w, w.fc2_b)

    def step_static(
        self,
        tokens: Tensor,  # (B,) each row's last token
        slot: Tensor,  # 0-dim long: the cache slot this step writes
        positions: Tensor,  # (B,) positional-embedding index of each row's token
        key_ok: Tensor,  # (B, 1, 1, slots) bool: a row's padding slots are never attended
        cache: KVCache,  # per layer (B, H, slots, hd), zeroed when made
        cross: KVCache,
        group: int = 1,
    ) -> Tensor:
        """One decoder step (B, n_state) whose shapes and host-side values are the same at
        every step of a pass: the step number lives on the device (``slot``), the new keys
        and values go in by ``index_copy_`` and every row attends all slots, those after
        ``slot`` masked. So the step can be captured once as a CUDA graph and replayed
        (:class:`worker.engine.decoding.StaticSteps`), or compiled without a graph break; the
        arithmetic is :meth:`forward`'s, over more (masked) keys."""
        x = self.token_embedding[tokens[:, None]] + self.positional[positions[:, None]]
        if self.dtype != torch.float32:
            x = x.to(self.dtype)
        slots = key_ok.shape[-1]
        visible = key_ok & (torch.arange(slots, device=slot.device) <= slot)
        at = slot.view(1)
        for w, (ck, cv), (xk, xv) in zip(self.layers, cache, cross, strict=True):
            q, k, v = self._qkv(x, w)
            ck.index_copy_(2, at, k)
            cv.index_copy_(2, at, v)
            a = F.scaled_dot_product_attention(q, ck, cv, attn_mask=visible)
            x = self._rest_of_block(x, a, w, xk, xv, group)
        out: Tensor = self._ln(x[:, 0], self.ln_w, self.ln_b)
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
