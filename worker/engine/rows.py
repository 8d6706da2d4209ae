"""The rows of a decode pass: what each row asks for (:class:`RowSpec`), what it gives back
(:class:`RowResult`), and the per-row tensors a pass carries from step to step (:class:`Rows`,
:class:`TimestampState`), compacted together as rows finish.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from worker.engine.textdecoder import KVCache


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
class Vocab:
    eot: int
    timestamp_begin: int
    no_timestamps: int | None
    no_speech: int | None
    blank: tuple[int, ...]  # SuppressBlank: " " and EOT at the first sampled position
    max_initial_index: int


@dataclass(frozen=True)
class TimestampState:
    """ApplyTimestampRules' view of each row's sampled tokens: whether the last and the one
    before were timestamps, and the last timestamp (-1: none yet)."""

    last: Tensor
    pen: Tensor
    last_tok: Tensor

    @classmethod
    def start(cls, rows: int, device: torch.device) -> TimestampState:
        yes = torch.ones(rows, dtype=torch.bool, device=device)
        # "fewer than 2 tokens" counts as both being timestamps, as whisper's rule reads it
        return cls(yes, yes, torch.full((rows,), -1, dtype=torch.long, device=device))

    def select(self, idx: Tensor) -> TimestampState:
        return TimestampState(self.last[idx], self.pen[idx], self.last_tok[idx])

    def after(self, tok: Tensor, timestamp_begin: int) -> TimestampState:
        is_ts = tok >= timestamp_begin
        return TimestampState(is_ts, self.last, torch.where(is_ts, tok, self.last_tok))


@dataclass
class Rows:
    """The rows of a pass as the decoder and the logit filters see them; compacted (or a
    job's row expanded into its beams) all together."""

    length: Tensor  # (R,) initial tokens of each row: its positions count from there
    key_ok: Tensor  # (R, 1, 1, slots) bool: a row's padding slots are never attended
    suppress: Tensor  # (R, n_vocab) bool
    ts: TimestampState
    cache: KVCache  # self-attention, per row
    cross: KVCache  # cross-attention, per audio (R / group of them)
    group: int = 1  # consecutive rows that share one audio (a job's beams)

    def select(self, rows: Tensor, audio: Tensor | None = None, group: int | None = None) -> Rows:
        """The rows `rows` (indices), their audio `audio` (None: the audio stays as it is)."""
        return Rows(
            length=self.length.index_select(0, rows),
            key_ok=self.key_ok.index_select(0, rows),
            suppress=self.suppress.index_select(0, rows),
            ts=self.ts.select(rows),
            cache=[(k.index_select(0, rows), v.index_select(0, rows)) for k, v in self.cache],
            cross=self.cross
            if audio is None
            else [(k.index_select(0, audio), v.index_select(0, audio)) for k, v in self.cross],
            group=self.group if group is None else group,
        )

    def reorder(self, src: Tensor, start: int, end: int) -> None:
        """Each row takes row src[i]'s timestamp state and cache slots start:end (a beam
        moving on; the slots before start are the same for every beam of a job)."""
        self.ts = self.ts.select(src)
        for k, v in self.cache:
            k[:, :, start:end] = k[:, :, start:end].index_select(0, src)
            v[:, :, start:end] = v[:, :, start:end].index_select(0, src)


@dataclass
class Prefilled:
    """A pass after its initial tokens went through the decoder."""

    width: int  # cache slots the longest initial tokens take; sampling writes from here
    budget: Tensor  # (B,) steps each row may take
    no_speech: list[float]
    logits: Tensor  # (B, n_vocab) at each row's last initial token
    rows: Rows


class Search(Protocol):
    """What the step loop needs of a search: its rows, the tokens they feed next, and an
    update per step."""

    rows: Rows
    tok: Tensor  # (R,) the tokens each row feeds into the next step
    size: int  # jobs (or rows) now in the batch: compaction's yardstick

    # Whether a row (or job) that is done stays harmless through more steps (its tokens
    # masked, its sums frozen), so the loop may read how many live only every few steps.
    defers_sync: bool

    def advance(self, logits: Tensor, it: int) -> None:
        """Take step `it`'s filtered logits."""
        ...

    def live_count(self) -> int:
        """The jobs (or rows) still live after the last step (a device sync on a GPU)."""
        ...

    def compact(self) -> None:
        """Drop the finished jobs (or rows) from the batch."""
        ...
