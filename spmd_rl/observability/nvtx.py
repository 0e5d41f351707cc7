"""NVTX ranges, so Nsight Systems shows the phases of a step (``gen``, ``update_actor`` ...) on its timeline."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch

try:  # NVIDIA's standalone bindings: mark ranges even where torch has no CUDA
    import nvtx as _nvtx_package
except ImportError:
    _nvtx_package = None


def _backend() -> tuple[Callable[[str], object], Callable[[], object]] | None:
    """(push, pop) of the first available NVTX implementation, or None."""
    if torch.cuda.is_available():
        return torch.cuda.nvtx.range_push, torch.cuda.nvtx.range_pop
    if _nvtx_package is not None:
        return _nvtx_package.push_range, _nvtx_package.pop_range
    return None


@contextmanager
def nvtx_range(name: str) -> Iterator[None]:
    """``with nvtx_range("gen"): ...`` marks the block on the NVTX timeline; a no-op without NVTX.

    Ranges are a few hundred nanoseconds when no tool listens, so they stay on in every run.
    """
    backend = _backend()
    if backend is None:
        yield
        return
    push, pop = backend
    push(name)
    try:
        yield
    finally:
        pop()  # also on an exception, or every later range would nest under this one
