"""Metric sinks: ``<run_dir>/metrics.jsonl`` (always) and a console line, written by rank 0."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

# Shown on the console line, in this order, when present.
CONSOLE_KEYS = (
    "critic/score/mean", "val-core/acc", "actor/pg_loss", "actor/grad_norm", "actor/entropy",
    "response_length/mean", "rollout/logprob_diff_max", "timing_s/step",
)


class MetricsLogger:
    """Append one JSON object per step to metrics.jsonl; print a compact line to the console."""

    def __init__(self, run_dir: str | Path, backends: list[str], enabled: bool, console_print=print):
        self.enabled = enabled
        self.console = "console" in backends
        self.path = Path(run_dir) / "metrics.jsonl"
        self._print = console_print
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _plain(v) for k, v in sorted(metrics.items())}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.console:
            self._print(format_console_line(step, metrics))


def format_console_line(step: int, metrics: dict[str, float]) -> str:
    parts = [f"step {step}"]
    for key in CONSOLE_KEYS:
        if key in metrics:
            parts.append(f"{key.split('/', 1)[-1] if key.startswith('actor/') else key}={metrics[key]:.4g}")
    # SFT's train/* and per-data-source validation metrics are few: show them all.
    parts.extend(f"{k}={v:.4g}" for k, v in sorted(metrics.items())
                 if k.startswith(("train/", "val-core/")) and k not in CONSOLE_KEYS)
    return " | ".join(parts)


def _plain(value):
    value = float(value)
    return value if math.isfinite(value) else str(value)
