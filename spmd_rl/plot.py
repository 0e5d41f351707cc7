"""Plot the curves of a run: ``python -m spmd_rl.plot <run_dir> [--out DIR] [--smooth K]``.

Reads ``<run_dir>/metrics.jsonl`` (one JSON object per logged step, see
``spmd_rl.observability.logger``) and writes PNG files to ``<run_dir>/plots``:

- ``score.png``: train score and validation accuracy per data source
- ``response_length.png``: train response length (mean, max) and validation mean
- ``kl.png``: whichever KL metrics the run logged (ppo_kl, kl_loss, reward_kl_penalty)
- ``entropy.png``: policy entropy
- ``losses.png``: pg_loss / vf_loss / kl_loss, and the gradient norms on a second panel
- ``timing.png``: stacked bars of phase times per step (binned), with the step time on top

The loading and organising functions below are pure (no matplotlib) so they can be tested and
reused; matplotlib is imported only to draw, and is an optional extra (``pip install -e '.[plot]'``).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from spmd_rl.errors import UserError, exit_on_user_error

METRICS_FILE = "metrics.jsonl"
USAGE = "python -m spmd_rl.plot <run_dir> [--out DIR] [--smooth K]"
# Bars in timing.png: more steps than this are averaged in equal-width bins so bars stay readable.
MAX_TIMING_BARS = 60
# Phase order of one step of the trainer; bars stack in this order (unknown phases go last).
TIMING_PHASES = (
    "gen", "gen_baseline", "reward", "old_log_prob", "ref", "values", "adv",
    "update_critic", "update_actor", "update_weights", "save_checkpoint", "testing",
)
TIMING_PREFIX = "timing_s/"
STEP_TIME_KEY = "timing_s/step"
# val-core/<data_source>/acc/mean@N, written by spmd_rl.trainer.validation (source may hold '/').
VAL_SOURCE_RE = re.compile(r"^val-core/(?P<source>.+)/acc/mean@(?P<n>\d+)$")
ALL_FIGURES = ("score.png", "response_length.png", "kl.png", "entropy.png", "losses.png", "timing.png")


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

@dataclass
class LoadedMetrics:
    """Rows of a metrics.jsonl that parsed, plus one warning per line that did not."""

    rows: list[dict[str, float]]
    warnings: list[str] = field(default_factory=list)


def find_metrics_file(run_dir: str | Path) -> Path:
    """``<run_dir>/metrics.jsonl`` (a path to the file itself is accepted too)."""
    path = Path(run_dir)
    if not path.exists():
        raise UserError(f"run directory '{path}' does not exist; pass the trainer.run_dir of a run")
    if path.is_file():
        return path
    metrics = path / METRICS_FILE
    if not metrics.is_file():
        raise UserError(f"no {METRICS_FILE} in '{path}'; pass the trainer.run_dir of a run that has "
                        f"logged at least one step")
    return metrics


def _number(value) -> float | None:
    """A metric value as float: JSON numbers, and the 'nan'/'inf' strings the logger writes for
    non-finite values; anything else (bools, text, lists) is not a metric and gives None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value.strip().lower() in ("nan", "inf", "+inf", "-inf", "infinity", "-infinity"):
        return float(value)
    return None


def parse_line(line: str) -> dict[str, float]:
    """One metrics.jsonl line → ``{"step": int, key: float, ...}``; ValueError says what is wrong."""
    if not line.strip():
        raise ValueError("empty line")
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    step = obj.get("step")
    if isinstance(step, bool) or not isinstance(step, (int, float)) or step != int(step):
        raise ValueError(f"missing or non-integer 'step' (got {step!r})")
    row: dict[str, float] = {"step": int(step)}
    for key, value in obj.items():
        if key != "step" and (number := _number(value)) is not None:
            row[key] = number
    return row


def load_metrics(path: str | Path) -> LoadedMetrics:
    """Parse every line of a metrics.jsonl; a bad line is skipped with a warning naming it, and a
    file with no good line at all is a UserError."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read '{path}': {e}") from None
    lines = text.splitlines()
    if not any(line.strip() for line in lines):
        raise UserError(f"'{path}' is empty; the run has not logged a step yet")
    rows, problems = [], []
    for number, line in enumerate(lines, start=1):
        try:
            rows.append(parse_line(line))
        except ValueError as e:
            problems.append(f"line {number}: {e}")
    if not rows:
        raise UserError(f"no valid row in '{path}' ({len(lines)} lines, all bad; first: {problems[0]})")
    return LoadedMetrics(rows, [f"{path} {problem}; skipped" for problem in problems])


# ---------------------------------------------------------------------------------------------
# Organising
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Series:
    """One metric over the steps that logged it: ``steps`` [S] int64 ascending, ``values`` [S]."""

    steps: np.ndarray
    values: np.ndarray


def collect_series(rows: list[dict[str, float]]) -> dict[str, Series]:
    """Per-metric series sorted by step. A step logged twice (a run resumed from an earlier
    checkpoint re-logs the steps after it) keeps the value of the later row."""
    by_key: dict[str, dict[int, float]] = {}
    for row in rows:
        step = int(row["step"])
        for key, value in row.items():
            if key != "step":
                by_key.setdefault(key, {})[step] = value
    out = {}
    for key, points in by_key.items():
        steps = sorted(points)
        out[key] = Series(np.asarray(steps, dtype=np.int64),
                          np.asarray([points[s] for s in steps], dtype=np.float64))
    return out


def moving_average(values: np.ndarray, k: int) -> np.ndarray:
    """Trailing mean over the last ``k`` points, [S] → [S]; the first k-1 points average what is
    there so far (no shift, no padding). Non-finite points are left out of every window, and a
    window with none finite gives NaN. k=1 returns the finite values unchanged."""
    if k < 1:
        raise ValueError(f"smoothing window must be >= 1, got {k}")
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    # Prefix sums of the finite values and their count give every window in O(S).
    csum = np.concatenate([[0.0], np.cumsum(np.where(finite, values, 0.0))])
    ccnt = np.concatenate([[0], np.cumsum(finite)])
    idx = np.arange(len(values))
    lo = np.maximum(idx + 1 - k, 0)
    total, count = csum[idx + 1] - csum[lo], ccnt[idx + 1] - ccnt[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


@dataclass(frozen=True)
class Line:
    """One curve: the metric ``key`` drawn with legend ``label``; sparse curves (validation every
    N steps) get markers and are never smoothed."""

    key: str
    label: str
    sparse: bool = False


@dataclass(frozen=True)
class Panel:
    title: str
    ylabel: str
    lines: tuple[Line, ...]


@dataclass(frozen=True)
class Figure:
    """A PNG file of one or more panels stacked vertically, sharing the step axis."""

    filename: str
    panels: tuple[Panel, ...]


def validation_lines(keys) -> list[Line]:
    """Validation accuracy per data source (``val-core/<src>/acc/mean@N``), sorted by source; the
    overall ``val-core/acc`` only when it is not the same as a single source's curve."""
    lines = []
    for key in sorted(keys):
        if m := VAL_SOURCE_RE.match(key):
            lines.append(Line(key, f"val {m['source']} (mean@{m['n']})", sparse=True))
    if "val-core/acc" in keys and len(lines) != 1:
        lines.insert(0, Line("val-core/acc", "val (all sources)", sparse=True))
    return lines


def figure_layout(keys) -> list[Figure]:
    """The line figures the run's metric ``keys`` allow: a curve whose key is absent is left out,
    a panel with no curve is dropped, and a figure with no panel is not listed."""
    keys = set(keys)
    wanted = [
        Figure("score.png", (
            Panel("Score", "score / accuracy",
                  (Line("critic/score/mean", "train score (mean)"), *validation_lines(keys))),)),
        Figure("response_length.png", (
            Panel("Response length", "tokens", (
                Line("response_length/mean", "train mean"),
                Line("response_length/max", "train max"),
                Line("val/response_length/mean", "val mean", sparse=True))),)),
        Figure("kl.png", (
            Panel("KL to the reference / old policy", "KL", (
                Line("actor/ppo_kl", "ppo_kl (policy vs rollout)"),
                Line("actor/kl_loss", "kl_loss (policy vs reference)"),
                Line("actor/reward_kl_penalty", "reward_kl_penalty (in reward)"))),)),
        Figure("entropy.png", (
            Panel("Policy entropy", "nats / token", (Line("actor/entropy", "entropy"),)),)),
        Figure("losses.png", (
            Panel("Losses", "loss", (
                Line("actor/pg_loss", "pg_loss"),
                Line("critic/vf_loss", "vf_loss"),
                Line("actor/kl_loss", "kl_loss"),
                Line("train/loss", "sft loss"))),
            Panel("Gradient norm", "norm (before clipping)", (
                Line("actor/grad_norm", "actor"),
                Line("critic/grad_norm", "critic"),
                Line("train/grad_norm", "sft"))))),
    ]
    out = []
    for fig in wanted:
        panels = tuple(Panel(p.title, p.ylabel, present)
                       for p in fig.panels if (present := tuple(ln for ln in p.lines if ln.key in keys)))
        if panels:
            out.append(Figure(fig.filename, panels))
    return out


def timing_phases(keys) -> list[str]:
    """``timing_s/<phase>`` keys in step order; phases not in TIMING_PHASES go last, sorted;
    ``timing_s/step`` (the whole step, drawn as a line) is not a phase."""
    present = {k for k in keys if k.startswith(TIMING_PREFIX) and k != STEP_TIME_KEY}
    known = [TIMING_PREFIX + p for p in TIMING_PHASES if TIMING_PREFIX + p in present]
    return known + sorted(present - set(known))


def bin_bounds(n: int, max_bins: int) -> list[tuple[int, int]]:
    """Split indices 0..n-1 into consecutive ``[start, end)`` bins of equal width
    ``ceil(n / max_bins)`` (the last may be shorter), so there are at most ``max_bins`` bins."""
    if max_bins < 1:
        raise ValueError(f"max_bins must be >= 1, got {max_bins}")
    width = max(1, math.ceil(n / max_bins))
    return [(start, min(start + width, n)) for start in range(0, n, width)]


@dataclass(frozen=True)
class TimingBins:
    """Phase times averaged per bin of steps.

    ``first``/``last`` [N] the step range of each bin; ``phases`` maps a phase name to [N] mean
    seconds per step (a step that did not run the phase counts 0, so a checkpoint every 50 steps
    shows its amortised cost); ``step_time`` [N] mean ``timing_s/step`` (NaN if none logged)."""

    first: np.ndarray
    last: np.ndarray
    phases: dict[str, np.ndarray]
    step_time: np.ndarray


def timing_bins(series: dict[str, Series], max_bins: int = MAX_TIMING_BARS) -> TimingBins | None:
    """Bin the steps that logged any timing into at most ``max_bins`` bars; None if none did."""
    phase_keys = timing_phases(series)
    timed = phase_keys + ([STEP_TIME_KEY] if STEP_TIME_KEY in series else [])
    if not timed:
        return None
    steps = np.unique(np.concatenate([series[k].steps for k in timed]))

    def dense(key: str, fill: float) -> np.ndarray:  # [len(steps)] with ``fill`` where not logged
        out = np.full(len(steps), fill)
        s = series[key]
        out[np.searchsorted(steps, s.steps)] = s.values
        return out

    table = {k: dense(k, 0.0) for k in phase_keys}
    total = dense(STEP_TIME_KEY, np.nan) if STEP_TIME_KEY in series else np.full(len(steps), np.nan)
    bounds = bin_bounds(len(steps), max_bins)

    return TimingBins(
        first=np.array([steps[a] for a, _ in bounds]),
        last=np.array([steps[b - 1] for _, b in bounds]),
        phases={k[len(TIMING_PREFIX):]: bin_means(v, bounds) for k, v in table.items()},
        step_time=bin_means(total, bounds),
    )


def bin_means(values: np.ndarray, bounds: list[tuple[int, int]]) -> np.ndarray:
    """Mean of the finite ``values`` [S] in each ``[start, end)`` bin → [N]; NaN for a bin with none."""
    out = np.full(len(bounds), np.nan)
    for i, (a, b) in enumerate(bounds):
        chunk = values[a:b]
        chunk = chunk[np.isfinite(chunk)]
        if chunk.size:
            out[i] = chunk.mean()
    return out


# ---------------------------------------------------------------------------------------------
# Drawing (matplotlib, Agg backend)
# ---------------------------------------------------------------------------------------------

def import_pyplot():
    """matplotlib.pyplot on the file-only Agg backend; a one-line error if the extra is missing."""
    try:
        import matplotlib
    except ImportError:
        raise UserError("matplotlib is not installed; install the plot extra: pip install -e '.[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _finite(values: np.ndarray) -> np.ndarray:
    # inf would blow up the axis limits; NaN leaves a gap in the line instead.
    return np.where(np.isfinite(values), values, np.nan)


def draw_figure(plt, fig_spec: Figure, series: dict[str, Series], smooth: int, title: str, path: Path):
    n = len(fig_spec.panels)
    fig, axes = plt.subplots(n, 1, figsize=(8, 3.2 * n + 0.6), sharex=True, squeeze=False)
    for ax, panel in zip(axes[:, 0], fig_spec.panels):
        for i, line in enumerate(panel.lines):
            s = series[line.key]
            color = f"C{i}"
            y = _finite(s.values)
            if line.sparse:
                ax.plot(s.steps, y, marker="o", markersize=4, color=color, label=line.label)
            elif smooth > 1:
                # Raw curve faint behind the smoothed one, so spikes stay visible.
                ax.plot(s.steps, y, color=color, alpha=0.25, linewidth=0.8)
                ax.plot(s.steps, moving_average(s.values, smooth), color=color,
                        label=f"{line.label} (avg {smooth})")
            else:
                ax.plot(s.steps, y, color=color, label=line.label)
        ax.set_title(panel.title, fontsize=10)
        ax.set_ylabel(panel.ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def draw_timing(plt, bins: TimingBins, title: str, path: Path):
    fig, ax = plt.subplots(figsize=(10, 4.8))
    center = (bins.first + bins.last) / 2.0
    width = 0.8 * (bins.last - bins.first + 1)
    bottom = np.zeros(len(center))
    cmap = plt.get_cmap("tab20")
    for i, (phase, seconds) in enumerate(bins.phases.items()):
        ax.bar(center, seconds, width=width, bottom=bottom, color=cmap(i % 20), label=phase)
        bottom = bottom + seconds
    if np.isfinite(bins.step_time).any():
        ax.plot(center, bins.step_time, color="black", marker=".", linewidth=1.5, label="step (total)")
    per_bar = int(bins.last[0] - bins.first[0] + 1)
    unit = "per step" if per_bar == 1 else f"mean per step, bars of {per_bar} steps"
    ax.set_title(f"Time per phase ({unit})", fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel("seconds")
    ax.grid(axis="y", alpha=0.3)
    # Legend top-to-bottom in the order the bars stack bottom-to-top, step line first.
    by_label = dict(zip(*ax.get_legend_handles_labels()[::-1]))
    order = [k for k in ["step (total)"] if k in by_label] + list(bins.phases)[::-1]
    ax.legend([by_label[k] for k in order], order,
              fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def render(run_dir: str | Path, out_dir: str | Path | None = None, smooth: int = 1) -> list[Path]:
    """Load ``<run_dir>/metrics.jsonl`` and write every figure that has data; returns the paths.
    Warnings about skipped lines go to stderr."""
    if smooth < 1:
        raise UserError(f"--smooth must be an integer >= 1 (1 = no smoothing), got {smooth}")
    metrics_path = find_metrics_file(run_dir)
    loaded = load_metrics(metrics_path)
    for warning in loaded.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    # A metric that is NaN at every step (a diverged run) has nothing to draw.
    series = {k: s for k, s in collect_series(loaded.rows).items() if np.isfinite(s.values).any()}
    layout, bins = figure_layout(series), timing_bins(series)
    if not layout and bins is None:
        raise UserError(f"nothing to plot in '{metrics_path}': it has no score, response length, KL, "
                        f"entropy, loss, grad norm or timing metric (its keys: {', '.join(sorted(series)[:8])})")
    plt = import_pyplot()
    out = Path(out_dir) if out_dir is not None else metrics_path.parent / "plots"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output directory '{out}': {e}") from None
    title = metrics_path.parent.name
    written = []
    try:
        for fig_spec in layout:
            draw_figure(plt, fig_spec, series, smooth, title, out / fig_spec.filename)
            written.append(out / fig_spec.filename)
        if bins is not None:
            draw_timing(plt, bins, title, out / "timing.png")
            written.append(out / "timing.png")
    except OSError as e:
        raise UserError(f"cannot write plots to '{out}': {e}") from None
    return written


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line through exit_on_user_error instead of usage + exit
        raise UserError(f"{message}; usage: {USAGE}")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = _Parser(prog="python -m spmd_rl.plot", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="trainer.run_dir of a run (holds metrics.jsonl)")
    p.add_argument("--out", default=None, help="output directory (default <run_dir>/plots)")
    p.add_argument("--smooth", default="1", help="moving-average window in steps (default 1 = none)")
    args = p.parse_args(argv)
    try:
        args.smooth = int(args.smooth)
    except ValueError:
        raise UserError(f"--smooth must be an integer >= 1 (1 = no smoothing), got {args.smooth!r}") from None
    return args


@exit_on_user_error
def main(argv: list[str] | None = None) -> list[Path]:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    written = render(args.run_dir, args.out, args.smooth)
    names = {p.name for p in written}
    print(f"wrote {len(written)} plot(s) to {written[0].parent}: {', '.join(p.name for p in written)}")
    if skipped := [f for f in ALL_FIGURES if f not in names]:
        print(f"skipped (no data in this run): {', '.join(skipped)}")
    return written


if __name__ == "__main__":
    main()
