"""Device check for the worker's GPU memory metric: allocate on CUDA, collect, parse.

Run on a GPU host from the repository root: python scripts/gpu_metrics_check.py
"""

from __future__ import annotations

import sys

import torch
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, ".")
from worker.gpu_metrics import GpuMemoryCollector

assert torch.cuda.is_available(), "no CUDA device"
x = torch.empty(256 * 1024 * 1024, dtype=torch.uint8, device="cuda")  # 256 MiB
registry = CollectorRegistry()
registry.register(GpuMemoryCollector())
samples = {
    (s.name, s.labels["kind"]): s.value
    for fam in text_string_to_metric_families(generate_latest(registry).decode())
    for s in fam.samples
}
allocated = samples[("whisperq_gpu_memory_bytes", "allocated")]
reserved = samples[("whisperq_gpu_memory_bytes", "reserved")]
print(f"{torch.cuda.get_device_name(0)}: allocated={allocated:.0f} reserved={reserved:.0f}")
assert allocated >= x.numel() and reserved >= allocated
print("GPU memory metric OK")
