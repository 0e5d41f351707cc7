"""Wall-clock timing of the phases of a step, reported as ``timing_s/<phase>``."""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch

from spmd_rl.observability.nvtx import nvtx_range


class PhaseTimer:
    """``with timer("gen"): ...`` accumulates seconds under ``timing_s/gen`` until ``pop()``.

    Each phase is also an NVTX range of the same name, so Nsight Systems timelines line up
    with the ``timing_s/*`` metrics."""

    def __init__(self, device: torch.device):
        self.device = device
        self.times: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        with nvtx_range(phase):
            self._sync()
            start = time.perf_counter()
            try:
                yield
            finally:
                self._sync()
                key = f"timing_s/{phase}"
                self.times[key] = self.times.get(key, 0.0) + time.perf_counter() - start

    def pop(self) -> dict[str, float]:
        times, self.times = self.times, {}
        return times

    def _sync(self):
        # Without a sync, CUDA time would be charged to whichever phase next blocks.
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
