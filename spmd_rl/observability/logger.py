"""Metric sinks, written by rank 0: ``<run_dir>/metrics.jsonl`` (always), a console line, and the
optional trackers of :mod:`spmd_rl.observability.trackers` (TensorBoard, W&B, MLflow, SwanLab)."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from spmd_rl.observability.trackers import build_trackers, check_installed

# Shown on the console line, in this order, when present.
CONSOLE_KEYS = (
    "critic/score/mean", "val-core/acc", "actor/pg_loss", "actor/grad_norm", "actor/entropy",
    "response_length/mean", "rollout/logprob_diff_max", "timing_s/step",
)


class MetricsLogger:
    """Append one JSON object per step to metrics.jsonl; print a compact line to the console;
    forward the numeric metrics to the chosen trackers.

    Every rank checks that the chosen trackers' packages are installed (so all ranks fail alike);
    only the enabled rank (rank 0) creates trackers. ``experiment`` empty = the run directory's name;
    ``config`` is the resolved config as a nested dict, recorded as the trackers' hyper-parameters.
    Call :meth:`close` at the end of the run so trackers flush and mark the run finished."""

    def __init__(self, run_dir: str | Path, backends: list[str], enabled: bool, console_print=print, *,
                 project: str = "spmd-rl", experiment: str = "", mlflow_tracking_uri: str = "",
                 config: dict | None = None):
        self.enabled = enabled
        self.console = "console" in backends
        self.path = Path(run_dir) / "metrics.jsonl"
        self._print = console_print
        self.trackers: list = []
        check_installed(backends)
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.trackers = build_trackers(backends, run_dir, project=project, experiment=experiment,
                                           mlflow_tracking_uri=mlflow_tracking_uri, config=config)

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
        if self.trackers:
            scalars = numeric_metrics(metrics)
            for tracker in self.trackers:
                tracker.log(step, scalars)

    def start_at(self, step: int) -> None:
        """Make ``metrics.jsonl`` hold only rows up to ``step`` (the step the run continues from).

        A crash after logging step k+2 but checkpointing k would otherwise log k+1 and k+2 twice;
        a fresh start (step 0) in a used run dir moves the old file aside instead of mixing runs."""
        if not self.enabled or not self.path.is_file():
            return
        lines = self.path.read_text().splitlines()
        if step == 0:
            aside = self.path.with_name(f"metrics.before_{time.strftime('%Y%m%d_%H%M%S')}.jsonl")
            os.replace(self.path, aside)
            print(f"moved the previous run's metrics to {aside}", flush=True)
            return
        kept = [line for line in lines if _step_of(line) is not None and _step_of(line) <= step]
        if len(kept) != len(lines):
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, self.path)

    def close(self) -> None:
        """Flush and finish every tracker; safe to call twice."""
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            tracker.close()

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


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
    """A JSON-safe value: numbers as float, NaN/inf as 'nan'/'inf', text and None as they are."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return value if value is None or isinstance(value, str) else str(value)
    return number if math.isfinite(number) else str(number)


def numeric_metrics(metrics: dict) -> dict[str, float]:
    """The values that convert to a Python float (numbers, 0-d tensors/arrays, bools); others are dropped.

    NaN and inf are kept: every supported tracker accepts them, and they mark a diverged run."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            continue
    return out


def build_metrics_logger(run_dir: str | Path, cfg, rank: int) -> MetricsLogger:
    """The run's logger from a config tree with a ``logging`` section (RL or SFT); trackers on rank 0."""
    from spmd_rl.config_loader import config_to_dict

    log = cfg.logging
    return MetricsLogger(run_dir, log.backends, enabled=rank == 0, project=log.project, experiment=log.experiment,
                         mlflow_tracking_uri=log.mlflow_tracking_uri, config=config_to_dict(cfg))
