"""Run plots: loading metrics.jsonl, series, smoothing, timing bins, figure layout, and the CLI."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from spmd_rl.errors import UserError
from spmd_rl.plot import (
    bin_bounds,
    bin_means,
    collect_series,
    figure_layout,
    load_metrics,
    moving_average,
    parse_line,
    timing_bins,
    timing_phases,
    validation_lines,
)

torch.set_num_threads(1)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# A small run: a validation-only row at step 0, three train steps, validation again at step 3.
ROWS = [
    {"step": 0, "val-core/acc": 0.25, "val-core/a/acc/mean@4": 0.2, "val-core/b/c/acc/mean@4": 0.3},
    {"step": 1, "critic/score/mean": 0.1, "actor/entropy": 0.9, "response_length/mean": 3.0,
     "timing_s/gen": 1.0, "timing_s/update_actor": 2.0, "timing_s/step": 3.5},
    {"step": 2, "critic/score/mean": 0.3, "actor/entropy": 0.7, "response_length/mean": 5.0,
     "timing_s/gen": 2.0, "timing_s/update_actor": 4.0, "timing_s/save_checkpoint": 1.0,
     "timing_s/step": 7.0},
    {"step": 3, "critic/score/mean": 0.2, "actor/entropy": "nan", "response_length/mean": 4.0,
     "timing_s/gen": 3.0, "timing_s/update_actor": 3.0, "timing_s/my_phase": 0.5,
     "timing_s/step": 6.5, "val-core/acc": 0.5, "val-core/a/acc/mean@4": 0.4,
     "val-core/b/c/acc/mean@4": 0.6, "note": "not a metric", "flag": True},
]


def write_run(tmp_path: Path, lines: list[str], name: str = "run") -> Path:
    run = tmp_path / name
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    return run


def good_lines() -> list[str]:
    return [json.dumps(r) for r in ROWS]


# ---------------------------------------------------------------------------------------------
# Loading and series
# ---------------------------------------------------------------------------------------------

def test_parse_line_keeps_numbers_and_nonfinite_strings_only():
    row = parse_line(json.dumps(ROWS[3]))
    assert row["step"] == 3 and row["critic/score/mean"] == 0.2
    assert math.isnan(row["actor/entropy"])  # the logger writes NaN as the string "nan"
    assert "note" not in row and "flag" not in row
    assert parse_line('{"step": 2.0, "x": "-inf"}') == {"step": 2, "x": -math.inf}


@pytest.mark.parametrize("line, message", [
    ("", "empty line"),
    ("   ", "empty line"),
    ('{"step": 1, "x": ', "not valid JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    ('{"x": 1.0}', "missing or non-integer 'step' (got None)"),
    ('{"step": 1.5}', "missing or non-integer 'step' (got 1.5)"),
    ('{"step": true}', "missing or non-integer 'step' (got True)"),
])
def test_parse_line_rejects_bad_lines(line, message):
    with pytest.raises(ValueError) as info:
        parse_line(line)
    assert message in str(info.value)


def test_collect_series_known_values(tmp_path):
    run = write_run(tmp_path, good_lines())
    loaded = load_metrics(run / "metrics.jsonl")
    assert loaded.warnings == []
    series = collect_series(loaded.rows)
    score = series["critic/score/mean"]
    assert score.steps.tolist() == [1, 2, 3] and score.values.tolist() == [0.1, 0.3, 0.2]
    val = series["val-core/b/c/acc/mean@4"]
    assert val.steps.tolist() == [0, 3] and val.values.tolist() == [0.3, 0.6]
    assert series["timing_s/save_checkpoint"].steps.tolist() == [2]
    ent = series["actor/entropy"].values
    assert ent[:2].tolist() == [0.9, 0.7] and math.isnan(ent[2])


def test_collect_series_sorts_steps_and_later_row_wins():
    # A resumed run re-logs steps after its checkpoint: the later row is the one that counts.
    rows = [{"step": 2, "x": 1.0}, {"step": 3, "x": 2.0}, {"step": 1, "x": 5.0}, {"step": 2, "x": 9.0}]
    s = collect_series(rows)["x"]
    assert s.steps.tolist() == [1, 2, 3] and s.values.tolist() == [5.0, 9.0, 2.0]


def test_load_metrics_skips_bad_lines_with_their_numbers(tmp_path):
    lines = good_lines()
    lines.insert(2, "{oops")
    lines.insert(4, "")
    run = write_run(tmp_path, lines)
    loaded = load_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in loaded.rows] == [0, 1, 2, 3]
    assert len(loaded.warnings) == 2
    assert "line 3: not valid JSON" in loaded.warnings[0]
    assert "line 5: empty line; skipped" in loaded.warnings[1]


def test_load_metrics_all_bad_or_empty_is_a_user_error(tmp_path):
    run = write_run(tmp_path, ["{oops", "[]"])
    with pytest.raises(UserError) as info:
        load_metrics(run / "metrics.jsonl")
    assert "no valid row" in str(info.value) and "2 lines, all bad" in str(info.value)
    assert "not valid JSON" in str(info.value)
    empty = write_run(tmp_path, [], name="empty")
    with pytest.raises(UserError, match="is empty"):
        load_metrics(empty / "metrics.jsonl")


# ---------------------------------------------------------------------------------------------
# Smoothing and binning
# ---------------------------------------------------------------------------------------------

def test_moving_average_trailing_window():
    x = np.array([1.0, 2.0, 3.0, 4.0, 10.0])
    np.testing.assert_allclose(moving_average(x, 1), x)
    np.testing.assert_allclose(moving_average(x, 2), [1.0, 1.5, 2.5, 3.5, 7.0])
    np.testing.assert_allclose(moving_average(x, 3), [1.0, 1.5, 2.0, 3.0, 17.0 / 3.0])
    np.testing.assert_allclose(moving_average(x, 100), [1.0, 1.5, 2.0, 2.5, 4.0])


def test_moving_average_leaves_out_nonfinite_points():
    x = np.array([1.0, np.nan, 3.0, np.inf, np.nan, np.nan])
    out = moving_average(x, 2)
    np.testing.assert_allclose(out[:5], [1.0, 1.0, 3.0, 3.0, np.nan])
    assert math.isnan(out[4]) and math.isnan(out[5])
    with pytest.raises(ValueError, match="must be >= 1, got 0"):
        moving_average(x, 0)


@pytest.mark.parametrize("n, max_bins, n_bins, width, last", [
    (150, 60, 50, 3, (147, 150)),
    (121, 60, 41, 3, (120, 121)),
    (60, 60, 60, 1, (59, 60)),
    (10, 60, 10, 1, (9, 10)),
    (7, 2, 2, 4, (4, 7)),
    (0, 60, 0, None, None),
])
def test_bin_bounds(n, max_bins, n_bins, width, last):
    bounds = bin_bounds(n, max_bins)
    assert len(bounds) == n_bins <= max_bins
    if n:
        assert bounds[0] == (0, width) and bounds[-1] == last
        # Consecutive and covering every index exactly once.
        assert [a for a, _ in bounds[1:]] == [b for _, b in bounds[:-1]]


def test_bin_means_skips_nonfinite():
    values = np.array([1.0, 3.0, np.nan, np.nan, 4.0])
    out = bin_means(values, [(0, 2), (2, 4), (4, 5)])
    assert out[0] == 2.0 and math.isnan(out[1]) and out[2] == 4.0


def test_timing_phases_order_and_step_excluded():
    keys = ["timing_s/step", "timing_s/update_actor", "timing_s/zz", "timing_s/gen", "timing_s/aa",
            "actor/pg_loss"]
    assert timing_phases(keys) == ["timing_s/gen", "timing_s/update_actor", "timing_s/aa", "timing_s/zz"]


def test_timing_bins_hand_computed(tmp_path):
    series = collect_series(load_metrics(write_run(tmp_path, good_lines()) / "metrics.jsonl").rows)
    # Steps 1, 2, 3 (step 0 has no timing) in at most 2 bins of width 2: {1, 2} and {3}.
    bins = timing_bins(series, max_bins=2)
    assert bins.first.tolist() == [1, 3] and bins.last.tolist() == [2, 3]
    assert list(bins.phases) == ["gen", "update_actor", "save_checkpoint", "my_phase"]
    assert bins.phases["gen"].tolist() == [1.5, 3.0]
    assert bins.phases["update_actor"].tolist() == [3.0, 3.0]
    # A phase a step did not run counts 0 in its bin (amortised cost).
    assert bins.phases["save_checkpoint"].tolist() == [0.5, 0.0]
    assert bins.phases["my_phase"].tolist() == [0.0, 0.5]
    assert bins.step_time.tolist() == [5.25, 6.5]
    # Without binning every step is its own bar.
    one = timing_bins(series)
    assert one.first.tolist() == [1, 2, 3] and one.phases["gen"].tolist() == [1.0, 2.0, 3.0]
    assert timing_bins(collect_series([{"step": 1, "x": 1.0}])) is None


# ---------------------------------------------------------------------------------------------
# Figure layout
# ---------------------------------------------------------------------------------------------

def test_validation_lines_per_source():
    keys = {"val-core/acc", "val-core/b/c/acc/mean@4", "val-core/a/acc/mean@4", "val/response_length/mean"}
    lines = validation_lines(keys)
    assert [ln.key for ln in lines] == ["val-core/acc", "val-core/a/acc/mean@4", "val-core/b/c/acc/mean@4"]
    assert [ln.label for ln in lines] == ["val (all sources)", "val a (mean@4)", "val b/c (mean@4)"]
    assert all(ln.sparse for ln in lines)
    # One source: its curve is the overall accuracy, so it is drawn once.
    single = validation_lines({"val-core/acc", "val-core/x/acc/mean@1"})
    assert [ln.key for ln in single] == ["val-core/x/acc/mean@1"]


def test_figure_layout_skips_missing_metrics():
    series = collect_series(ROWS[:3])
    layout = {f.filename: f for f in figure_layout(series)}
    # No KL metric and no loss / grad norm in this run: those figures are not listed.
    assert sorted(layout) == ["entropy.png", "response_length.png", "score.png"]
    (score_panel,) = layout["score.png"].panels
    assert [ln.key for ln in score_panel.lines] == [
        "critic/score/mean", "val-core/acc", "val-core/a/acc/mean@4", "val-core/b/c/acc/mean@4"]
    (length_panel,) = layout["response_length.png"].panels
    assert [ln.key for ln in length_panel.lines] == ["response_length/mean"]


def test_figure_layout_losses_panels_and_kl_subset():
    keys = {"actor/pg_loss", "critic/vf_loss", "actor/grad_norm", "actor/ppo_kl", "actor/kl_loss"}
    layout = {f.filename: f for f in figure_layout(keys)}
    assert sorted(layout) == ["kl.png", "losses.png"]
    losses, grads = layout["losses.png"].panels
    assert [ln.key for ln in losses.lines] == ["actor/pg_loss", "critic/vf_loss", "actor/kl_loss"]
    assert [ln.key for ln in grads.lines] == ["actor/grad_norm"]
    assert [ln.key for ln in layout["kl.png"].panels[0].lines] == ["actor/ppo_kl", "actor/kl_loss"]
    # Losses without any grad norm: a single panel.
    assert len({f.filename: f for f in figure_layout({"actor/pg_loss"})}["losses.png"].panels) == 1


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mpl_env():
    env = dict(os.environ)
    env.pop("MPLBACKEND", None)  # the CLI must pick the file-only backend itself
    return env


def run_cli(args, env, code=None):
    cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", "spmd_rl.plot"]
    return subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_cli_writes_the_pngs_that_have_data(tmp_path, mpl_env):
    import matplotlib.image

    lines = good_lines()
    lines.insert(1, "{corrupt")
    run = write_run(tmp_path, lines)
    out = tmp_path / "out"
    proc = run_cli([run, "--out", out, "--smooth", "2"], mpl_env)
    assert proc.returncode == 0, proc.stderr
    expected = ["score.png", "response_length.png", "entropy.png", "timing.png"]
    assert sorted(p.name for p in out.iterdir()) == sorted(expected)
    stdout = proc.stdout.splitlines()
    assert stdout == [f"wrote 4 plot(s) to {out}: {', '.join(expected)}",
                      "skipped (no data in this run): kl.png, losses.png"]
    # The corrupt line is named on stderr and skipped.
    assert proc.stderr.strip().splitlines() == [
        f"warning: {run / 'metrics.jsonl'} line 2: not valid JSON (Expecting property name enclosed "
        f"in double quotes at column 2); skipped"]
    for name in expected:
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC
        image = matplotlib.image.imread(out / name)
        height, width, channels = image.shape
        assert 300 <= height <= 1500 and 600 <= width <= 1500 and channels in (3, 4)
        # Not a blank canvas: a drawn figure has many distinct colours.
        assert len(np.unique(image[..., :3].mean(axis=-1))) > 20


def test_cli_default_out_dir_and_all_nan_metric_skipped(tmp_path, mpl_env):
    # actor/entropy is NaN at every step: no entropy.png.
    run = write_run(tmp_path, [
        json.dumps({"step": 1, "actor/pg_loss": 0.5, "actor/grad_norm": 1.0, "actor/entropy": "nan"}),
        json.dumps({"step": 2, "actor/pg_loss": 0.25, "actor/grad_norm": 2.0, "actor/entropy": "nan"})])
    proc = run_cli([run], mpl_env)
    assert proc.returncode == 0, proc.stderr
    assert [p.name for p in (run / "plots").iterdir()] == ["losses.png"]
    assert proc.stdout.splitlines()[0] == f"wrote 1 plot(s) to {run / 'plots'}: losses.png"
    assert proc.stderr == ""


def _bad_cases(tmp_path):
    write_run(tmp_path, [], name="empty")
    write_run(tmp_path, ["{oops", "not json"], name="corrupt")
    write_run(tmp_path, [json.dumps({"step": 1, "train/lr": 0.1})], name="nothing")
    (tmp_path / "nometrics").mkdir()
    return {
        "no_args": ([], "the following arguments are required: run_dir"),
        "missing_dir": ([tmp_path / "nope"], "does not exist"),
        "no_metrics_file": ([tmp_path / "nometrics"], "no metrics.jsonl in"),
        "empty_file": ([tmp_path / "empty"], "is empty"),
        "all_lines_bad": ([tmp_path / "corrupt"], "2 lines, all bad; first: line 1: not valid JSON"),
        "nothing_to_plot": ([tmp_path / "nothing"], "nothing to plot"),
        "smooth_zero": ([tmp_path / "empty", "--smooth", "0"], "--smooth must be an integer >= 1"),
        "smooth_text": ([tmp_path / "empty", "--smooth", "x"], "--smooth must be an integer >= 1"),
        "unknown_flag": ([tmp_path / "empty", "--bogus"], "unrecognized arguments: --bogus"),
    }


@pytest.mark.parametrize("case", ["no_args", "missing_dir", "no_metrics_file", "empty_file",
                                  "all_lines_bad", "nothing_to_plot", "smooth_zero", "smooth_text",
                                  "unknown_flag"])
def test_cli_bad_input_one_line_error(tmp_path, mpl_env, case):
    args, message = _bad_cases(tmp_path)[case]
    proc = run_cli(args, mpl_env)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), proc.stderr
    assert message in err[0]
    assert "Traceback" not in proc.stderr


def test_cli_without_matplotlib_names_the_extra(tmp_path, mpl_env):
    run = write_run(tmp_path, good_lines())
    # A None entry in sys.modules makes `import matplotlib` raise ImportError.
    code = "import sys; sys.modules['matplotlib'] = None; from spmd_rl.plot import main; main(sys.argv[1:])"
    proc = run_cli([run], mpl_env, code=code)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: matplotlib is not installed; install the plot extra: "
                                   "pip install -e '.[plot]'")
    assert not (run / "plots").exists()
