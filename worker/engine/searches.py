"""The searches of a decode pass, each behind the shared step loop
(:meth:`worker.engine.decoding.BatchDecoder._search_loop`): :class:`Greedy` is whisper's
``GreedyDecoder`` (argmax, or a draw at the row's temperature), :class:`Beam` its
``BeamSearchDecoder`` + ``MaximumLikelihoodRanker`` with each job's beams as consecutive
rows. Every update is a fixed number of tensor ops over all rows: no Python loop over rows
runs per step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F  # noqa: N812 (torch's own spelling)
from torch import Tensor

from worker.engine.rows import Prefilled, RowResult, Vocab


class Greedy:
    """whisper's GreedyDecoder on every row: argmax at temperature 0, else a draw from
    Categorical(logits / T) (Gumbel-max); a row is done at EOT or at its length budget."""

    # A done row writes EOT and adds nothing to its sums, however many steps it sits through.
    # Not when sampling: each step draws for every row of the batch, so steps run for nothing
    # (and compaction's timing) would change the draws of the rows still live.
    defers_sync = True

    def __init__(
        self,
        pre: Prefilled,
        temperatures: list[float],
        sample_len: int,
        vocab: Vocab,
        generator: torch.Generator | None,
    ) -> None:
        dev = pre.logits.device
        n = len(temperatures)
        self.vocab, self.generator = vocab, generator
        self.rows = pre.rows
        self.size = n
        temps = torch.tensor(temperatures, device=dev)
        self.sampled = any(t > 0 for t in temperatures)
        self.defers_sync = not self.sampled
        # Per row, compacted with the rows: its index in the pass, and the search's state.
        self.index = torch.arange(n, device=dev)
        self.budget = pre.budget
        self.temps = temps
        self.safe_temps = torch.where(temps > 0, temps, torch.ones_like(temps))[:, None]
        self.sum_lp = torch.zeros(n, device=dev)
        self.live = torch.ones(n, dtype=torch.bool, device=dev)
        self.steps = torch.zeros(n, dtype=torch.long, device=dev)
        self.tok = torch.empty(0, dtype=torch.long, device=dev)  # fed from the second step on
        # By index in the pass, never compacted: what the results are read from.
        self.out_tokens = torch.full((n, sample_len), vocab.eot, dtype=torch.long, device=dev)
        self.final_sum = torch.zeros(n, device=dev)
        self.final_steps = torch.zeros(n, dtype=torch.long, device=dev)

    def advance(self, logits: Tensor, it: int) -> None:
        v = self.vocab
        nxt = logits.argmax(dim=-1)
        if self.sampled:
            u = torch.rand(logits.shape, device=logits.device, generator=self.generator)
            drawn = (logits / self.safe_temps - torch.log(-torch.log(u))).argmax(dim=-1)
            nxt = torch.where(self.temps > 0, drawn, nxt)
        lp = F.log_softmax(logits, dim=-1)
        live = self.live
        self.sum_lp = self.sum_lp + lp.gather(1, nxt[:, None])[:, 0] * live
        self.steps = self.steps + live
        self.out_tokens[self.index, it] = torch.where(live, nxt, v.eot)
        self.rows.ts = self.rows.ts.after(nxt, v.timestamp_begin)
        self.live = live & (nxt != v.eot) & (self.budget > it + 1)
        self.tok = nxt

    def live_count(self) -> int:
        return int(self.live.sum())

    def _save(self) -> None:
        self.final_sum[self.index] = self.sum_lp
        self.final_steps[self.index] = self.steps

    def compact(self) -> None:
        self._save()
        keep = self.live.nonzero()[:, 0]
        self.index, self.budget, self.temps, self.safe_temps = (
            t.index_select(0, keep) for t in (self.index, self.budget, self.temps, self.safe_temps)
        )
        self.sum_lp, self.live, self.steps, self.tok = (
            t.index_select(0, keep) for t in (self.sum_lp, self.live, self.steps, self.tok)
        )
        self.rows = self.rows.select(keep, keep)
        self.size = int(keep.shape[0])

    def results(self, pre: Prefilled) -> list[RowResult]:
        self._save()
        eot = self.vocab.eot
        sums, steps = self.final_sum.tolist(), self.final_steps.tolist()
        results = []
        for i, toks in enumerate(self.out_tokens.tolist()):
            cut = toks.index(eot) if eot in toks else len(toks)
            results.append(
                RowResult(
                    tokens=toks[:cut],
                    sum_logprob=sums[i],
                    no_speech_prob=pre.no_speech[i],
                    steps=steps[i],
                )
            )
        return results


class Beam:
    """whisper's BeamSearchDecoder over many jobs, each job's beams consecutive rows."""

    # A job that is done keeps its beams in the batch until compaction, inactive: its
    # finished list is closed and its steps no longer counted.
    defers_sync = True

    def __init__(
        self,
        pre: Prefilled,
        beam_size: int,
        patience: list[float],
        sample_len: int,
        vocab: Vocab,
    ) -> None:
        dev = pre.logits.device
        n = len(patience)
        self.vocab, self.width = vocab, pre.width
        self.beam, self.cands = beam_size, beam_size + 1
        self.rows = pre.rows  # one row per job until the first step's beams
        self.size = n  # jobs now in the batch
        self._live = torch.tensor(n, device=dev)  # jobs not yet done, as of the last step
        self.max_cand = torch.tensor([round(beam_size * p) for p in patience], device=dev)
        if bool((self.max_cand < 1).any()):
            raise ValueError(f"patience {patience} leaves no candidates for a beam of {beam_size}")
        cap = max(beam_size, int(self.max_cand.max()))
        # Finished sequences per job, in whisper's dict order: sampled tokens (EOT-padded),
        # their count and their sum of log-probabilities. By job index, never compacted.
        # Slot `cap` is a spare: the writes of each step go to every job's first `beam`
        # candidates, and those that are no finished sequence land there (so no step reads
        # how many there are).
        self.spare = cap
        slots = cap + 1
        self.fin_tok = torch.full((n, slots, sample_len), vocab.eot, dtype=torch.long, device=dev)
        self.fin_len = torch.zeros((n, slots), dtype=torch.long, device=dev)
        self.fin_lp = torch.full((n, slots), -math.inf, device=dev)
        self.n_fin = torch.zeros(n, dtype=torch.long, device=dev)
        self.steps = torch.zeros(n, dtype=torch.long, device=dev)
        # Per job, compacted together once enough jobs are done: its index in this pass.
        self.job = torch.arange(n, device=dev)
        self.budget = pre.budget
        self.active = torch.ones(n, dtype=torch.bool, device=dev)
        # Per beam row: its tokens so far and its sum of log-probabilities.
        self.hist = torch.full((n * beam_size, sample_len), vocab.eot, dtype=torch.long, device=dev)
        self.sum_lp = torch.zeros(n * beam_size, device=dev)
        self.beam_ids = torch.arange(beam_size, device=dev)
        self.tok = torch.empty(0, dtype=torch.long, device=dev)  # fed from the second step on

    def _candidates(self, logits: Tensor, it: int) -> tuple[Tensor, Tensor, Tensor]:
        """Per job, every beam's top tokens ranked by cumulative log-probability: their
        scores, tokens and source beams (jobs, candidates)."""
        lp = F.log_softmax(logits, dim=-1)
        if it == 0:  # the beams are still one row per job: its candidates are its top tokens
            score, cand_tok = lp.topk(self.cands, dim=-1)  # sorted, as whisper's dict order
            return score, cand_tok, torch.zeros_like(cand_tok)
        top_lp, top_tok = lp.topk(self.cands, dim=-1)  # (rows, cands)
        flat = (self.sum_lp[:, None] + top_lp).view(self.size, self.beam * self.cands)
        score, order = flat.sort(dim=-1, descending=True, stable=True)
        return score, top_tok.view(self.size, -1).gather(1, order), order // self.cands

    def advance(self, logits: Tensor, it: int) -> None:
        v, beam, dev = self.vocab, self.beam, logits.device
        score, cand_tok, cand_beam = self._candidates(logits, it)
        # The next beams: the first `beam` candidates without EOT. An EOT candidate
        # ranked above the last of them is a finished sequence.
        not_eot = cand_tok != v.eot
        before = not_eot.cumsum(dim=-1) - not_eot.long()
        in_reach = before < beam
        pos = torch.arange(score.shape[1], device=dev).expand_as(score)
        keys = torch.where(not_eot & in_reach, pos, pos + score.shape[1])
        pick = keys.topk(beam, dim=-1, largest=False).indices  # in rank order
        src = torch.arange(self.size, device=dev)[:, None] * beam + cand_beam.gather(1, pick)
        src = src.view(-1)
        new_tok = cand_tok.gather(1, pick).view(-1)
        new_lp = score.gather(1, pick).view(-1)
        self._finish_eot(~not_eot & in_reach, score, cand_beam, it)

        # The beams move on: rows take their source's history, cache and timestamp state
        # (the prefix slots are the same for every beam of a job and stay).
        if it == 0:
            per_row = torch.arange(self.size, device=dev).repeat_interleave(beam)
            self.rows = self.rows.select(per_row, group=beam)
        else:
            self.hist = self.hist.index_select(0, src)
            self.rows.reorder(src, self.width, self.width + it)
        self.hist[:, it] = new_tok
        self.rows.ts = self.rows.ts.after(new_tok, v.timestamp_begin)
        self.sum_lp = new_lp
        self.tok = new_tok
        self.steps.index_add_(0, self.job, self.active.long())

        n_fin_now = self.n_fin[self.job]
        done = self.active & ((n_fin_now >= self.max_cand[self.job]) | (self.budget <= it + 1))
        self._finish_unfinished(done, n_fin_now, it)
        self.active = self.active & ~done
        self._live = self.active.sum()

    def live_count(self) -> int:
        return int(self._live)

    def _record(self, keep: Tensor, slot: Tensor, rows: Tensor, length: int, lp: Tensor) -> None:
        """Finished sequences: (jobs, beam) candidates, those kept at their list's `slot`,
        the others at the spare slot; each the first `length` tokens of its beam row."""
        slot = torch.where(keep, slot, self.spare)
        at = self.job[:, None].expand_as(slot)
        if length:
            self.fin_tok[at, slot, :length] = self.hist[rows, :length]
        self.fin_len[at, slot] = length
        self.fin_lp[at, slot] = lp
        self.n_fin.index_add_(0, self.job, keep.sum(dim=-1))

    def _finish_eot(self, finished: Tensor, score: Tensor, cand_beam: Tensor, it: int) -> None:
        """Record the EOT candidates in reach as finished sequences, while a job has room.
        A job has at most `beam` of them (each beam proposes EOT once at most): its first
        `beam` candidates with the EOT ones first, in rank order, hold them all."""
        finished = finished & self.active[:, None]
        n_cand = finished.shape[1]
        pos = torch.arange(n_cand, device=finished.device).expand_as(finished)
        first = torch.where(finished, pos, pos + n_cand).topk(self.beam, largest=False).indices
        is_fin = finished.gather(1, first)
        rank = self.beam_ids[None, :]  # the finished ones lead, in rank order
        n_fin_now = self.n_fin[self.job]
        keep = is_fin & (n_fin_now[:, None] + rank < self.max_cand[self.job][:, None])
        source = cand_beam.gather(1, first) if it > 0 else torch.zeros_like(first)
        rows = torch.arange(self.size, device=first.device)[:, None] * self.beam + source
        self._record(keep, n_fin_now[:, None] + rank, rows, it, score.gather(1, first))

    def _finish_unfinished(self, done: Tensor, n_fin_now: Tensor, it: int) -> None:
        """Jobs done: their unfinished beams, best first, fill their lists up to `beam`."""
        beam = self.beam
        ranked = self.sum_lp.view(self.size, beam).sort(dim=-1, descending=True, stable=True)
        need = (beam - n_fin_now).clamp(min=0)
        fill = done[:, None] & (self.beam_ids[None, :] < need[:, None])
        rows = torch.arange(self.size, device=done.device)[:, None] * beam + ranked.indices
        slot = n_fin_now[:, None] + self.beam_ids[None, :]
        self._record(fill, slot, rows, it + 1, ranked.values)

    def compact(self) -> None:
        keep_jobs = self.active.nonzero()[:, 0]
        keep_rows = (keep_jobs[:, None] * self.beam + self.beam_ids).view(-1)
        self.job, self.budget, self.active = (
            t.index_select(0, keep_jobs) for t in (self.job, self.budget, self.active)
        )
        self.hist, self.sum_lp, self.tok = (
            t.index_select(0, keep_rows) for t in (self.hist, self.sum_lp, self.tok)
        )
        self.rows = self.rows.select(keep_rows, keep_jobs)
        self.size = int(keep_jobs.shape[0])

    def results(self, pre: Prefilled, alphas: list[float | None]) -> list[RowResult]:
        """MaximumLikelihoodRanker: the best sum of log-probabilities per sampled token, or
        over Google NMT's length penalty ((5 + length) / 6) ** alpha, in float64 as whisper
        divides; the first of equals wins (np.argmax)."""
        lens, lps = self.fin_len.tolist(), self.fin_lp.double().tolist()
        best = [
            max(range(n_j), key=lambda c: (_ranked(lps[j][c], lens[j][c], alphas[j]), -c))
            for j, n_j in enumerate(self.n_fin.tolist())
        ]
        dev = self.fin_tok.device
        chosen = self.fin_tok[torch.arange(len(best), device=dev), torch.tensor(best, device=dev)]
        steps = self.steps.tolist()
        return [
            RowResult(
                tokens=toks[: lens[j][best[j]]],
                sum_logprob=lps[j][best[j]],
                no_speech_prob=pre.no_speech[j],
                steps=steps[j] * self.beam,
            )
            for j, toks in enumerate(chosen.tolist())
        ]


def _ranked(sum_logprob: float, length: int, alpha: float | None) -> float:
    """MaximumLikelihoodRanker's score of one finished sequence."""
    if alpha is None:
        return sum_logprob / max(length, 1)
    return float(sum_logprob / ((5 + length) / 6) ** alpha)
