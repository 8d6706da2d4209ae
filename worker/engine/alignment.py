"""Word alignment of many windows at once: ``whisper.timing.find_alignment`` over a batch.

find_alignment runs the model on ``[*sot_sequence, no_timestamps, *text_tokens, eot]`` with
hooks that keep the cross-attention QK of ``model.alignment_heads``, then, per window: a
softmax over the window's frames, normalisation, a median filter and DTW, whose path is cut
at word boundaries. Here the forward is whisper's own modules with its non-SDPA attention
written out, so the QK comes back without hooks (the shared model is never touched) and
without ``disable_sdpa()``, a class-wide switch that would flip under another lane's
encoder. Rows are padded at the end to the longest: the causal mask keeps the padding out
of every real position. Per row, the rest is whisper's code on whisper's tensor shapes.

Exactness: on a CPU, matrix products of fp32 come out with other last bits for another
row count or thread count (MKL picks its kernels and splits its work by shape: 1-15 rows
and 16 or more differ, and on 2 threads more shapes do), and so would the word
probabilities and, now and then, a DTW path. So there the engine aligns each window alone,
re-encoded as find_alignment re-encodes it, on transcribe()'s thread count
(:func:`worker.engine.windows.align_words`): whisper's result bit for bit. On a GPU, fp16
differs per batch shape anyway; all rows go in one forward on the window's own encoder
output.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from itertools import pairwise
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 (torch's own spelling)
from torch import Tensor

from worker.engine.types import ENCODER_TOKENS_PER_SECOND

if TYPE_CHECKING:
    from whisper.model import AudioEncoder, MultiHeadAttention, ResidualAttentionBlock, Whisper
    from whisper.timing import WordTiming
    from whisper.tokenizer import Tokenizer

# find_alignment()'s defaults: transcribe() passes neither.
MEDFILT_WIDTH = 7
QK_SCALE = 1.0
# numba's "workqueue" threading layer (where neither OpenMP nor TBB is found) aborts the
# process when two threads run a parallel function at once; lanes align side by side.
_DTW_LOCK = threading.Lock()


@dataclass(frozen=True)
class AlignRow:
    """One window to align: its job's tokenizer, its segments' text tokens in order, and the
    mel frames of audio in it (find_alignment's num_frames)."""

    tokenizer: Tokenizer
    text_tokens: list[int]
    num_frames: int

    @property
    def sequence(self) -> list[int]:
        tok = self.tokenizer
        return [*tok.sot_sequence, tok.no_timestamps, *self.text_tokens, tok.eot]


def _attention(
    attn: MultiHeadAttention, x: Tensor, xa: Tensor | None, mask: Tensor | None
) -> tuple[Tensor, Tensor]:
    """MultiHeadAttention.forward with qkv_attention's non-SDPA branch (find_alignment runs
    the model under disable_sdpa()): the output and the QK."""
    q = attn.query(x)
    k = attn.key(x if xa is None else xa)
    v = attn.value(x if xa is None else xa)
    _, n_ctx, n_state = q.shape
    scale = (n_state // attn.n_head) ** -0.25
    q = q.view(*q.shape[:2], attn.n_head, -1).permute(0, 2, 1, 3)
    k = k.view(*k.shape[:2], attn.n_head, -1).permute(0, 2, 1, 3)
    v = v.view(*v.shape[:2], attn.n_head, -1).permute(0, 2, 1, 3)
    qk = (q * scale) @ (k * scale).transpose(-1, -2)
    if mask is not None:
        qk = qk + mask[:n_ctx, :n_ctx]
    qk = qk.float()
    w = F.softmax(qk, dim=-1).to(q.dtype)
    out = (w @ v).permute(0, 2, 1, 3).flatten(start_dim=2)
    return attn.out(out), qk.detach()


def _block(
    block: ResidualAttentionBlock, x: Tensor, xa: Tensor | None = None, mask: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """ResidualAttentionBlock.forward; the cross-attention's QK beside it."""
    x = x + _attention(block.attn, block.attn_ln(x), None, mask)[0]
    qk = None
    if block.cross_attn is not None and block.cross_attn_ln is not None:
        out, qk = _attention(block.cross_attn, block.cross_attn_ln(x), xa, None)
        x = x + out
    x = x + block.mlp(block.mlp_ln(x))
    return x, qk


@torch.inference_mode()
def encode(model: Whisper, mel: Tensor) -> Tensor:
    """AudioEncoder.forward without SDPA: find_alignment encodes its window again, under
    disable_sdpa(), so the decode pass's encoder output has other last bits."""
    enc: AudioEncoder = model.encoder
    x = F.gelu(enc.conv1(mel))
    x = F.gelu(enc.conv2(x))
    x = x.permute(0, 2, 1)
    x = (x + enc.positional_embedding).to(x.dtype)
    for block in enc.blocks:
        x, _ = _block(block, x)
    out: Tensor = enc.ln_post(x)
    return out


def _decode(
    model: Whisper, tokens: Tensor, xa: Tensor, heads: list[tuple[int, int]]
) -> tuple[Tensor, dict[tuple[int, int], Tensor]]:
    """TextDecoder.forward up to its final layer norm: hidden states (B, T, n_state) and the
    cross-attention QK (B, T, n_audio_ctx) of each (layer, head) in `heads` (the rest of a
    layer's QK is dropped at once: a batch of it is large)."""
    dec = model.decoder
    x = dec.token_embedding(tokens) + dec.positional_embedding[: tokens.shape[-1]]
    x = x.to(xa.dtype)
    kept: dict[tuple[int, int], Tensor] = {}
    for layer, block in enumerate(dec.blocks):
        x, qk = _block(block, x, xa, dec.mask)
        assert qk is not None
        kept.update({(lay, h): qk[:, h].clone() for lay, h in heads if lay == layer})
    return dec.ln(x), kept


@torch.inference_mode()
def find_alignments(model: Whisper, rows: list[AlignRow], audio: Tensor) -> list[list[WordTiming]]:
    """find_alignment() of every row in one forward; audio: (rows, n_audio_ctx, n_state),
    the encoder output of each row's window."""
    out: list[list[WordTiming]] = [[] for _ in rows]
    live = [i for i, r in enumerate(rows) if r.text_tokens]  # nothing to align: no words
    if not live:
        return out
    seqs = [rows[i].sequence for i in live]
    width = max(len(s) for s in seqs)
    pad = rows[live[0]].tokenizer.eot  # any token: the causal mask keeps it out of the rest
    tokens = torch.tensor([s + [pad] * (width - len(s)) for s in seqs]).to(audio.device)
    heads = [(int(lay), int(h)) for lay, h in model.alignment_heads.indices().T.tolist()]
    hidden, qks = _decode(model, tokens, audio[live], heads)
    embedding = model.decoder.token_embedding.weight
    for j, (i, seq) in enumerate(zip(live, seqs, strict=True)):
        n = len(seq)
        # the vocabulary projection row by row, as whisper's (1, T) forward makes it
        logits = hidden[j : j + 1, :n] @ torch.transpose(embedding.to(hidden.dtype), 0, 1)
        weights = torch.stack([qks[h][j, :n] for h in heads])
        out[i] = _timings(rows[i], logits.float()[0], weights)
    return out


def _timings(row: AlignRow, logits: Tensor, qk: Tensor) -> list[WordTiming]:
    """The rest of find_alignment() for one row: token probabilities, the DTW path through
    the alignment heads' attention, word boundaries."""
    from whisper.timing import WordTiming, dtw, median_filter

    tokenizer, text_tokens = row.tokenizer, row.text_tokens
    sampled_logits = logits[len(tokenizer.sot_sequence) :, : tokenizer.eot]
    token_probs = sampled_logits.softmax(dim=-1)
    text_token_probs = token_probs[np.arange(len(text_tokens)), text_tokens].tolist()

    weights = qk[:, :, : row.num_frames // 2]
    weights = (weights * QK_SCALE).softmax(dim=-1)
    std, mean = torch.std_mean(weights, dim=-2, keepdim=True, unbiased=False)
    weights = (weights - mean) / std
    weights = median_filter(weights, MEDFILT_WIDTH)
    matrix = weights.mean(axis=0)
    matrix = matrix[len(tokenizer.sot_sequence) : -1]
    with _DTW_LOCK:
        text_indices, time_indices = dtw(-matrix)

    words, word_tokens = tokenizer.split_to_word_tokens([*text_tokens, tokenizer.eot])
    if len(word_tokens) <= 1:
        return []  # eot only (whisper: its lookups below would crash)
    word_boundaries = np.pad(np.cumsum([len(t) for t in word_tokens[:-1]]), (1, 0))
    jumps = np.pad(np.diff(text_indices), (1, 0), constant_values=1).astype(bool)
    jump_times = time_indices[jumps] / ENCODER_TOKENS_PER_SECOND
    start_times = jump_times[word_boundaries[:-1]]
    end_times = jump_times[word_boundaries[1:]]
    word_probabilities = [np.mean(text_token_probs[i:j]) for i, j in pairwise(word_boundaries)]
    return [
        WordTiming(word, tokens, start, end, probability)
        for word, tokens, start, end, probability in zip(
            words, word_tokens, start_times, end_times, word_probabilities, strict=False
        )
    ]
