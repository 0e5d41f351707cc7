"""Profiling of chosen training steps: torch.profiler Chrome traces and Nsight Systems capture ranges.

Two independent mechanisms, both keyed by the 1-based step number:

* ``profiler.enable`` / ``profiler.steps`` (config): a ``torch.profiler`` trace of each chosen
  step, written as ``trace_step<N>_rank<R>.json`` (open in Perfetto or chrome://tracing).
* ``SPMD_RL_NSYS_STEPS`` (environment, e.g. ``3-5``): ``cudaProfilerStart`` before the first step
  of each run of consecutive steps and ``cudaProfilerStop`` after its last, for
  ``nsys profile --capture-range=cudaProfilerApi`` (``launch/nsys_profile.sh``). CUDA only.

Use one at a time: both attach CUPTI, and a torch trace inside an nsys capture distorts both.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import torch

if TYPE_CHECKING:
    from spmd_rl.config import ProfilerConfig

NSYS_STEPS_ENV = "SPMD_RL_NSYS_STEPS"


def parse_step_list(text: str) -> set[int]:
    """``"3-5"`` -> {3, 4, 5}; ``"2,7"``; ``"2-3,8"``; ``""`` -> no steps. Steps count from 1."""
    steps: set[int] = set()
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        first, sep, last = part.partition("-")
        try:
            lo, hi = (int(first), int(last)) if sep else (int(first), int(first))
        except ValueError:
            lo, hi = 0, -1
        if not 1 <= lo <= hi:
            raise ValueError(f"bad step list {text!r} at {part!r}: use steps >= 1 as N, A-B (A <= B) "
                             "or a comma-separated mix, e.g. 3-5,8")
        steps.update(range(lo, hi + 1))
    return steps


class StepProfiler:
    """``with profiler.step(n): <train step n>`` (or ``start_step(n)`` ... ``end_step(n)``).

    Steps that are not chosen cost a set lookup. ``close()`` ends a capture a short run left open.
    """

    def __init__(self, cfg: ProfilerConfig, run_dir: str | Path, rank: int, device: torch.device | str,
                 nsys_steps: str | None = None):
        self.cfg = cfg
        self.rank = rank
        self.device = torch.device(device)
        self.out_dir = Path(cfg.out_dir) if cfg.out_dir else Path(run_dir) / "profile"
        self.torch_steps = set(cfg.steps) if cfg.enable else set()
        text = os.environ.get(NSYS_STEPS_ENV, "") if nsys_steps is None else nsys_steps
        self.nsys_steps = parse_step_list(text)
        self.traces: list[Path] = []  # traces written so far
        self._prof: torch.profiler.profile | None = None
        self._prof_step: int | None = None
        self._cuda_capturing = False

    @property
    def _on_cuda(self) -> bool:
        return self.device.type == "cuda" and torch.cuda.is_available()

    def start_step(self, step: int) -> None:
        if step in self.nsys_steps and self._on_cuda and not self._cuda_capturing:
            torch.cuda.profiler.start()
            self._cuda_capturing = True
        if step in self.torch_steps and self._prof is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self._on_cuda:
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._prof = torch.profiler.profile(activities=activities, record_shapes=self.cfg.record_shapes,
                                                with_stack=self.cfg.with_stack)
            self._prof.start()
            self._prof_step = step

    def end_step(self, step: int) -> None:
        if self._prof is not None and self._prof_step == step:
            self._write_trace()
        # Keep one capture open over consecutive steps: nsys's capture-range-end=stop ends at the first stop.
        if self._cuda_capturing and step + 1 not in self.nsys_steps:
            self._stop_cuda_capture()

    @contextmanager
    def step(self, step: int) -> Iterator[None]:
        self.start_step(step)
        try:
            yield
        finally:
            self.end_step(step)

    def close(self) -> None:
        """Write an unfinished trace and stop an open capture (the run ended inside a range)."""
        if self._prof is not None:
            self._write_trace()
        if self._cuda_capturing:
            self._stop_cuda_capture()

    def _write_trace(self) -> None:
        if self._on_cuda:
            torch.cuda.synchronize(self.device)  # kernels still queued would be missing from the trace
        self._prof.stop()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"trace_step{self._prof_step}_rank{self.rank}.json"
        self._prof.export_chrome_trace(str(path))
        self.traces.append(path)
        self._prof, self._prof_step = None, None

    def _stop_cuda_capture(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.profiler.stop()
        self._cuda_capturing = False
