"""Peak memory of a step: the CUDA caching allocator's high-water marks and the host RSS peak."""

from __future__ import annotations

import resource
import sys

import torch

GIB = 1024**3


def memory_metrics(device: torch.device | str) -> dict[str, float]:
    """``perf/*`` peak-memory metrics in GiB since the previous call (CUDA) or process start (host).

    On CUDA: ``perf/max_memory_allocated_gb`` (tensors) and ``perf/max_memory_reserved_gb``
    (what the caching allocator holds, the number that hits OOM); the peaks are reset after
    reading, so each step reports its own peak. Always: ``perf/cpu_memory_rss_gb``, the
    process's resident-set high-water mark, which the OS never resets (it covers offloaded
    shards and the CPU path).
    """
    device = torch.device(device)
    metrics: dict[str, float] = {}
    if device.type == "cuda":
        metrics["perf/max_memory_allocated_gb"] = torch.cuda.max_memory_allocated(device) / GIB
        metrics["perf/max_memory_reserved_gb"] = torch.cuda.max_memory_reserved(device) / GIB
        torch.cuda.reset_peak_memory_stats(device)
    metrics["perf/cpu_memory_rss_gb"] = peak_rss_bytes() / GIB
    return metrics


def peak_rss_bytes() -> int:
    """The process's maximum resident set size in bytes (``getrusage``'s ``ru_maxrss``)."""
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kilobytes, macOS bytes.
    return maxrss if sys.platform == "darwin" else maxrss * 1024
