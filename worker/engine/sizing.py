"""How many rows a batch holds when ``ENGINE_MAX_BATCH_ROWS`` is unset: on a CUDA device as
many as its free memory fits, bucketed to a power of two; elsewhere a fixed default.

The estimate per row (a job's current window) adds what a pass keeps on the device for it:
the encoder's activations and output (kept for the temperature fallback), the
cross-attention keys and values of every decoder layer, a full self-attention cache
(``n_text_ctx`` slots), and a step's fp32 vocabulary-sized tensors. On the H200 run of
bench/RESULTS.md (tiny.en, fp16) the peak was 16 MiB per row; this estimate says 23 MiB for
tiny.en. A beam-search job holds five rows of self-attention cache and logits: batches full
of them can still run out of memory, which splits the batch in two and retries
(:func:`worker.engine.windows.with_oom_split`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from whisper.model import ModelDimensions

# Share of the free device memory (measured once the model is loaded) the batches may use;
# the rest is allocator slack, cuBLAS workspaces and the beam jobs' extra rows.
MEMORY_SHARE = 0.7
MIN_AUTO_ROWS = 1
MAX_AUTO_ROWS = 1024  # the setting's own upper bound
# Encoder tensors of (n_audio_ctx, n_audio_state) alive at once per window, its output
# included: the two conv outputs at twice the length, the residual, the MLP's 4x hidden.
ENCODER_COPIES = 9
# (rows, n_vocab) fp32 tensors alive at once in a step: logits, log-softmax (the timestamp
# rule's and the search's), Gumbel noise, sorting and masks.
LOGITS_COPIES = 8


def bytes_per_row(dims: ModelDimensions, dtype: torch.dtype) -> int:
    """Device memory one row of a batch takes, at most (a greedy or sampled row)."""
    item = int(torch.empty((), dtype=dtype).element_size())
    encoder = ENCODER_COPIES * dims.n_audio_ctx * dims.n_audio_state * item
    cross = 2 * dims.n_text_layer * dims.n_audio_ctx * dims.n_text_state * item
    self_cache = 2 * dims.n_text_layer * dims.n_text_ctx * dims.n_text_state * item
    logits = LOGITS_COPIES * dims.n_vocab * 4
    return int(encoder + cross + self_cache + logits)


def rows_for_memory(
    free_bytes: int,
    dims: ModelDimensions,
    dtype: torch.dtype,
    cap: int = MAX_AUTO_ROWS,
) -> int:
    """Rows whose batches fit MEMORY_SHARE of `free_bytes`: the largest power of two that
    fits, at least MIN_AUTO_ROWS and at most `cap`."""
    fits = int(free_bytes * MEMORY_SHARE) // bytes_per_row(dims, dtype)
    if fits < MIN_AUTO_ROWS:
        return MIN_AUTO_ROWS
    return min(cap, 1 << (fits.bit_length() - 1))


def default_batch_rows(
    device: torch.device, dims: ModelDimensions, dtype: torch.dtype, fixed: int
) -> int:
    """The engine's rows when none are configured: `fixed` off CUDA, else what the device's
    free memory fits now (call it once the model and its decoder copy are loaded)."""
    if device.type != "cuda":
        return fixed
    free, _total = torch.cuda.mem_get_info(device)
    return rows_for_memory(free, dims, dtype)
