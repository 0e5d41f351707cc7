"""Peak-memory metrics: the host RSS high-water mark on CPU, the CUDA allocator peaks (faked) on GPU."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from spmd_rl.observability import memory
from spmd_rl.observability.memory import GIB, memory_metrics

torch.set_num_threads(1)


def test_cpu_reports_a_plausible_rss_peak():
    buf = torch.ones(32 * 2**20 // 4)  # touch 32 MiB so the peak is at least this process plus it
    now_gb = _resident_gb()  # read before: the peak read after can only be higher
    metrics = memory_metrics("cpu")
    assert set(metrics) == {"perf/cpu_memory_rss_gb"}
    rss = metrics["perf/cpu_memory_rss_gb"]
    total_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    # A process that imported torch and holds 32 MiB is well above 0.05 GiB and below the machine's memory.
    assert 0.05 < rss < total_gb
    if now_gb is not None:
        # A high-water mark is never below what was resident before it, up to the kernel's lazily
        # synced per-CPU RSS counters (a few hundred kB seen; 8 MiB allowed).
        assert rss >= now_gb - 8 / 1024
    del buf


def _resident_gb() -> float | None:
    """VmRSS (kB) from /proc on Linux, None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) * 1024 / GIB


def test_cuda_reads_then_resets_the_allocator_peaks(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d: calls.append(("alloc", d)) or 3 * GIB)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda d: calls.append(("reserved", d)) or 5 * GIB // 2)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d: calls.append(("reset", d)))
    monkeypatch.setattr(memory, "peak_rss_bytes", lambda: GIB // 4)
    cuda1 = torch.device("cuda", 1)
    assert memory_metrics(cuda1) == {"perf/max_memory_allocated_gb": 3.0, "perf/max_memory_reserved_gb": 2.5,
                                     "perf/cpu_memory_rss_gb": 0.25}
    # Reset after both reads, so the next step reports its own peak.
    assert calls == [("alloc", cuda1), ("reserved", cuda1), ("reset", cuda1)]


@pytest.mark.parametrize("platform, factor", [("linux", 1024), ("darwin", 1)])
def test_ru_maxrss_units(monkeypatch, platform, factor):
    class Usage:
        ru_maxrss = 2048

    monkeypatch.setattr(memory.sys, "platform", platform)
    monkeypatch.setattr(memory.resource, "getrusage", lambda who: Usage)
    assert memory.peak_rss_bytes() == 2048 * factor
