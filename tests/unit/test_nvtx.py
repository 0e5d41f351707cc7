"""NVTX ranges: a no-op without CUDA or the nvtx package, push/pop pairs with one; PhaseTimer opens one per phase."""

from __future__ import annotations

import time

import pytest
import torch

from spmd_rl.observability import nvtx
from spmd_rl.observability.nvtx import nvtx_range
from spmd_rl.observability.timing import PhaseTimer

torch.set_num_threads(1)


class Recorder:
    """Stands in for an NVTX implementation and records the calls."""

    def __init__(self):
        self.calls: list[tuple] = []

    def push_range(self, name):
        self.calls.append(("push", name))

    def pop_range(self):
        self.calls.append(("pop",))


def _forbidden(*args):
    raise AssertionError("torch.cuda.nvtx must not be called without CUDA")


def test_noop_on_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(nvtx, "_nvtx_package", None)
    monkeypatch.setattr(torch.cuda.nvtx, "range_push", _forbidden)
    monkeypatch.setattr(torch.cuda.nvtx, "range_pop", _forbidden)
    with nvtx_range("gen"):
        x = 1 + 1
    assert x == 2 and nvtx._backend() is None


def test_cuda_pushes_and_pops_even_on_error(monkeypatch):
    rec = Recorder()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda.nvtx, "range_push", rec.push_range)
    monkeypatch.setattr(torch.cuda.nvtx, "range_pop", rec.pop_range)
    with nvtx_range("outer"):
        with pytest.raises(RuntimeError, match="boom"), nvtx_range("inner"):
            raise RuntimeError("boom")
    assert rec.calls == [("push", "outer"), ("push", "inner"), ("pop",), ("pop",)]


def test_nvtx_package_used_without_cuda(monkeypatch):
    rec = Recorder()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(nvtx, "_nvtx_package", rec)
    with nvtx_range("reward"):
        pass
    assert rec.calls == [("push", "reward"), ("pop",)]


def test_timer_accumulates_and_opens_a_range_per_phase(monkeypatch):
    rec = Recorder()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(nvtx, "_nvtx_package", rec)
    timer = PhaseTimer(torch.device("cpu"))
    for _ in range(2):
        with timer("gen"):
            time.sleep(0.01)
    with timer("update_actor"):
        pass
    times = timer.pop()
    assert set(times) == {"timing_s/gen", "timing_s/update_actor"}
    assert 0.02 <= times["timing_s/gen"] < 1.0  # two 10 ms phases accumulate under one key
    assert timer.pop() == {}
    assert rec.calls == [("push", "gen"), ("pop",), ("push", "gen"), ("pop",), ("push", "update_actor"), ("pop",)]


def test_timer_on_cpu_without_nvtx_still_times(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(nvtx, "_nvtx_package", None)
    timer = PhaseTimer(torch.device("cpu"))
    with pytest.raises(ValueError), timer("step"):
        time.sleep(0.005)
        raise ValueError("a failing phase is still charged")
    assert timer.pop()["timing_s/step"] >= 0.005
