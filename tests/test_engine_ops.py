"""Host work per decoder step stays flat in the batch's rows: a count of the torch ops each
step dispatches (bench/engine_ops.py), never a timing. A per-row Python loop in the step
(one torch op per row) would make the count grow with the rows and fail here."""

from __future__ import annotations

from typing import Any

import pytest

from bench.engine_ops import Search, StepCount, count_steps
from tests.support.random_model import random_model

# The count at many rows may exceed the count at few by this much at most: a per-row op at
# 64 rows adds at least 60.
SLACK_OPS = 3
SLACK_SHARE = 0.10


@pytest.fixture(scope="module")
def model() -> Any:
    return random_model()


def assert_flat(few: StepCount, many: StepCount) -> None:
    assert few.steps > 1 and many.steps > 1
    limit = few.ops_per_step + max(SLACK_OPS, SLACK_SHARE * few.ops_per_step)
    assert many.ops_per_step <= limit, (few, many)
    # each step of a pass costs the same: nothing per step depends on the data
    assert many.min_ops == many.max_ops, many


@pytest.mark.parametrize(("search", "few", "many"), [("greedy", 4, 64), ("sampled", 4, 64)])
def test_ops_per_step_do_not_grow_with_rows(
    model: Any, search: Search, few: int, many: int
) -> None:
    small = count_steps(few, search, sample_len=6, model=model)
    large = count_steps(many, search, sample_len=6, model=model)
    assert (small.rows, large.rows) == (few, many)
    assert_flat(small, large)


def test_beam_ops_per_step_do_not_grow_with_jobs(model: Any) -> None:
    small = count_steps(1, "beam", sample_len=6, model=model)
    large = count_steps(12, "beam", sample_len=6, model=model)
    assert (small.rows, large.rows) == (5, 60)  # each job's beams are rows of the pass
    assert_flat(small, large)


@pytest.mark.parametrize(("search", "jobs"), [("greedy", 4), ("beam", 2)])
def test_steps_read_the_device_every_few_steps_when_told(
    model: Any, monkeypatch: pytest.MonkeyPatch, search: Search, jobs: int
) -> None:
    """What a GPU does (SYNC_EVERY_CUDA): the loop reads how many rows (or beam jobs) live
    every few steps, so the host queues steps without waiting for the device. Nothing else
    in a step reads it: a beam's finished sequences are written for its first candidates
    whether there are any (no count of them read back)."""
    from worker.engine import decoding

    every_step = count_steps(jobs, search, sample_len=17, model=model)
    assert every_step.reads_per_step == 1.0  # the live count, read after each step
    monkeypatch.setattr(decoding, "SYNC_EVERY_CPU", 8)
    deferred = count_steps(jobs, search, sample_len=17, model=model)
    assert deferred.steps == every_step.steps
    assert deferred.reads_per_step <= 2 / 15, deferred  # steps 8 and 16 of 16 step pairs
