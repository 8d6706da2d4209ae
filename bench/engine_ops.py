"""Host work per decoder step: torch ops dispatched per step while the engine decodes.

Run from the repository root::

    python -m bench.engine_ops [--rows 1 8 64 256] [--sample-len 12] [--search greedy beam]

A small random Whisper (tests.support.random_model) runs in a real :class:`Engine` (one
lane). N jobs of 2 s noise are submitted at once and decoded as one batch of N rows, their
EOT suppressed (``suppress_tokens``) and the fallback thresholds off, so every row decodes
exactly ``sample_len`` tokens in one pass. A ``TorchDispatchMode`` on the lane's thread
counts every aten op it dispatches, and a pre-hook on the batched decoder notes the count at
each decoder call: the ops between two consecutive step calls are one whole decode step
(decoder forward, vocabulary projection, suppression and timestamp rules, sampling or beam
bookkeeping, stopping). The table gives the median of those per-step counts.

Nothing on the per-step path may loop over rows in Python, so "ops per step" must not grow
with the rows (tests/test_engine_ops.py holds the engine to that). Prints Markdown and
asserts nothing; op counts, not timings, so the numbers are the same on any machine.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from app.jobs.options import BEAM_SIZE, TranscribeOptions
from worker.engine import Engine, EngineJob

SAMPLE_RATE = 16_000
DEFAULT_ROWS = (1, 8, 64, 256)
DEFAULT_SAMPLE_LEN = 12
Search = Literal["greedy", "sampled", "beam"]
SEARCHES: tuple[Search, ...] = ("greedy", "sampled", "beam")
# The multilingual vocabulary's <|endoftext|> (the random model's).
RANDOM_MODEL_EOT = 50257


# Ops whose result the host must wait for (a value, or an output shape that depends on data):
# on a GPU each is a synchronisation. Under inference mode int() and bool() of a tensor
# dispatch item and is_nonzero; outside it, _local_scalar_dense.
HOST_READS = frozenset(
    {
        torch.ops.aten.item.default,
        torch.ops.aten._local_scalar_dense.default,
        torch.ops.aten.is_nonzero.default,
        torch.ops.aten.nonzero.default,
        torch.ops.aten.nonzero_numpy.default,
    }
)


# torch's dispatch-mode base class is unannotated.
class OpCounter(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Counts every aten op dispatched on the thread where the mode is active."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.ops = 0
        self.reads = 0  # tensor-to-Python reads: on a GPU, each waits for the device

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        self.ops += 1
        if func in HOST_READS:
            self.reads += 1
        return func(*args, **(kwargs or {}))


class CountingEngine(Engine):
    """The real Engine with an op counter active on its lane's thread (dispatch modes are
    thread-local: counting around submit() would see nothing)."""

    def __init__(self, model: Any, counter: OpCounter, **kwargs: Any) -> None:
        self.counter = counter  # set before Engine.__init__ starts the lanes
        super().__init__(model, **kwargs)

    def _run(self) -> None:
        with self.counter:
            super()._run()


@dataclass(frozen=True)
class StepCount:
    """One engine run of `jobs` jobs, each one window, decoded in one pass."""

    search: Search
    jobs: int
    rows: int  # decoder rows per step (a beam job's beams are rows)
    passes: int  # decode passes (prefills)
    steps: int  # decoder step calls (prefills excluded)
    ops_per_step: float  # median of the ops between consecutive step calls of a pass
    min_ops: int
    max_ops: int
    total_ops: int  # the lane's whole run: admission, encoder, prefill, steps, results
    reads_per_step: float = 0.0  # host reads of device values between consecutive steps

    @property
    def ops_per_step_per_row(self) -> float:
        return self.ops_per_step / self.rows

    @property
    def other_ops_per_job(self) -> float:
        """Ops of the run outside its decode steps, per job: admission, encoder (one window
        per call on a CPU), prefill, results and segments; once per window, not per token."""
        return (self.total_ops - self.steps * self.ops_per_step) / self.jobs


def options_for(search: Search) -> TranscribeOptions:
    """One decode per window at one temperature, EOT never sampled."""
    return TranscribeOptions(
        language="en",
        temperature=0.5 if search == "sampled" else 0.0,
        suppress_tokens=f"-1,{RANDOM_MODEL_EOT}",
        temperature_increment_on_fallback=None,
        compression_ratio_threshold=None,
        logprob_threshold=None,
        no_speech_threshold=None,
        patience=1.0 if search == "beam" else None,
    )


def count_steps(
    jobs: int,
    search: Search = "greedy",
    sample_len: int = DEFAULT_SAMPLE_LEN,
    model: Any = None,
) -> StepCount:
    """Decode `jobs` jobs of 2 s noise as one batch and count the ops of each decoder step."""
    from tests.support.random_model import random_model

    counter = OpCounter()
    engine = CountingEngine(
        model if model is not None else random_model(),
        counter,
        max_batch_rows=jobs,
        max_wait_ms=120_000,  # the batch closes as soon as all jobs are in
        sample_len=sample_len,
        lanes=1,
    )
    # (slot, rows, ops so far, reads so far) at each decoder call
    calls: list[tuple[int, int, int, int]] = []

    def on_call(_m: Any, args: tuple[Any, ...]) -> None:
        calls.append((int(args[2]), int(args[0].shape[0]), counter.ops, counter.reads))

    hook = engine.decoder.register_forward_pre_hook(on_call)
    opts = options_for(search)
    audios = [
        (np.random.default_rng(seed).standard_normal(2 * SAMPLE_RATE) * 0.1).astype(np.float32)
        for seed in range(jobs)
    ]
    try:
        with ThreadPoolExecutor(max_workers=min(jobs, 16)) as pool:
            futures = list(pool.map(lambda a: engine.submit(EngineJob(a, opts)), audios))
        for fut in futures:
            fut.result(timeout=600)
    finally:
        engine.close(60)
        hook.remove()
    return _summarise(search, jobs, calls, counter.ops)


def _summarise(
    search: Search, jobs: int, calls: list[tuple[int, int, int, int]], total_ops: int
) -> StepCount:
    prefills = [c for c in calls if c[0] == 0]
    steps = [c for c in calls if c[0] > 0]
    # ops between two step calls one slot apart: exactly one step of one pass
    pairs = [(a, b) for a, b in itertools.pairwise(calls) if a[0] > 0 and b[0] == a[0] + 1]
    per_step = [b[2] - a[2] for a, b in pairs]
    if not per_step:
        raise RuntimeError(f"no two consecutive decoder steps seen ({len(calls)} calls)")
    return StepCount(
        search=search,
        jobs=jobs,
        rows=max(c[1] for c in steps),
        passes=len(prefills),
        steps=len(steps),
        ops_per_step=statistics.median(per_step),
        min_ops=min(per_step),
        max_ops=max(per_step),
        total_ops=total_ops,
        reads_per_step=sum(b[3] - a[3] for a, b in pairs) / len(pairs),
    )


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


def table(counts: Sequence[StepCount]) -> str:
    headers = [
        "search",
        "jobs",
        "rows",
        "passes",
        "decode steps",
        "ops per step (min-max)",
        "ops per step per row",
        "ops, whole run",
        "host reads per step",
        "ops outside steps per job",
    ]
    body = [
        [
            c.search,
            str(c.jobs),
            str(c.rows),
            str(c.passes),
            str(c.steps),
            f"{c.ops_per_step:.0f} ({c.min_ops}-{c.max_ops})",
            f"{c.ops_per_step_per_row:.2f}",
            str(c.total_ops),
            f"{c.reads_per_step:.2f}",
            f"{c.other_ops_per_job:.0f}",
        ]
        for c in counts
    ]
    return markdown_table(headers, body)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.engine_ops", description=__doc__)
    parser.add_argument("--rows", type=int, nargs="+", default=list(DEFAULT_ROWS))
    parser.add_argument("--sample-len", type=int, default=DEFAULT_SAMPLE_LEN)
    parser.add_argument("--search", choices=SEARCHES, nargs="+", default=["greedy", "beam"])
    args = parser.parse_args(argv)
    from tests.support.random_model import random_model

    model = random_model()
    counts = []
    for search in args.search:
        for n in args.rows:
            # a beam job is BEAM_SIZE rows: as many jobs as give the asked rows (at least 1)
            jobs = max(1, round(n / BEAM_SIZE)) if search == "beam" else n
            counts.append(count_steps(jobs, search, args.sample_len, model))
            print(f"... {search}, {jobs} jobs counted", file=sys.stderr, flush=True)
    print(
        f"torch ops dispatched per decoder step (TorchDispatchMode on the lane's thread), "
        f"1-layer random Whisper on CPU, sample_len={args.sample_len}, EOT suppressed; "
        f"beam search: beam {BEAM_SIZE}, patience 1, each job's beams are rows"
    )
    print()
    print(table(counts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
