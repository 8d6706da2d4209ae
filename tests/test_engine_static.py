"""The static decoder step is what a CUDA graph can capture: traced whole (no graph break,
which torch.compile's fullgraph refuses), no value read back to the host and no shape that
depends on one (a CUDA graph replays fixed kernels on fixed shapes), and nothing the host
hands it changes from step to step (one trace serves every step while the rows stay the
same). Its transcripts equal the eager step's on real speech: tests/test_engine_real.py."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from app.jobs.options import parse_options
from tests.support.random_model import random_model
from worker.engine import Engine, EngineJob
from worker.engine.decoding import StaticSteps

# What reads a device value on the host inside a trace (this torch traces .item() into the
# graph rather than breaking it, so a full graph alone does not prove there is none).
HOST_READS = {"item", "tolist", "nonzero", "_local_scalar_dense"}


def host_dependent(gm: torch.fx.GraphModule) -> list[str]:
    """The nodes of a trace that read a value on the host or have a shape made from one."""
    bad = []
    for node in gm.graph.nodes:
        name = getattr(node.target, "__name__", str(node.target))
        if node.op in ("call_method", "call_function") and name in HOST_READS:
            bad.append(node.name)
        value = node.meta.get("example_value")
        if isinstance(value, torch.Tensor) and not all(isinstance(d, int) for d in value.shape):
            bad.append(node.name)
    return bad


def _noise(seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(32_000) * 0.1).astype(np.float32)


def _decode(engine: Engine, fields: dict[str, str]) -> list[Any]:
    opts = parse_options(fields)
    futures = [engine.submit(EngineJob(_noise(seed), opts)) for seed in range(6)]
    return [f.result(timeout=600) for f in futures]


@pytest.mark.parametrize("fields", [{}, {"patience": "1"}], ids=["greedy", "beam"])
def test_the_static_step_is_one_trace_for_every_step_of_a_pass(
    monkeypatch: pytest.MonkeyPatch, fields: dict[str, str]
) -> None:
    model = random_model()
    no_fallback = {"temperature_increment_on_fallback": "none", **fields}
    engine = Engine(model, max_batch_rows=6, max_wait_ms=60_000, lanes=1, step_mode="static")
    # a CPU's oneDNN projection is no tensor a trace can hold; on CUDA it is never used
    engine.decoder._embed_onednn = None
    try:
        plain = _decode(engine, no_fallback)
        traces: list[list[str]] = []  # each trace's host-dependent nodes
        steps: list[int] = []

        def backend(gm: torch.fx.GraphModule, inputs: list[Any]) -> Any:
            traces.append(host_dependent(gm))
            return gm.forward

        run = StaticSteps._run
        compiled = torch.compile(run, backend=backend, fullgraph=True, dynamic=False)

        def counted(self: StaticSteps, tok: torch.Tensor, rows: Any) -> torch.Tensor:
            steps.append(tok.shape[0])
            out: torch.Tensor = compiled(self, tok, rows)
            return out

        monkeypatch.setattr(StaticSteps, "_run", counted)
        torch._dynamo.reset()
        traced = _decode(engine, no_fallback)
    finally:
        engine.close(5)
        torch._dynamo.reset()
    assert [(r.text, r.segments) for r in traced] == [(r.text, r.segments) for r in plain]
    # a trace per distinct row count (compaction, a job's row becoming its beams); every
    # other step replays one
    assert len(steps) >= 10 * len(traces), (len(steps), traces)
    assert len(traces) <= len(set(steps)) + 1, (traces, set(steps))
    assert traces and not any(traces), traces
