"""The worker's CUDA memory as a Prometheus gauge, read at scrape time (torch only)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector


class GpuMemoryCollector(Collector):
    def collect(self) -> Iterable[GaugeMetricFamily]:
        if not torch.cuda.is_available() or not torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
            return
        fam = GaugeMetricFamily(
            "whisperq_gpu_memory_bytes", "CUDA memory of this worker", labels=["device", "kind"]
        )
        for i in range(torch.cuda.device_count()):
            fam.add_metric([str(i), "allocated"], float(torch.cuda.memory_allocated(i)))
            fam.add_metric([str(i), "reserved"], float(torch.cuda.memory_reserved(i)))
        yield fam
