"""metrics.jsonl follows the checkpoint a run continues from: no duplicated or mixed-run rows."""

import json

from spmd_rl.observability.logger import MetricsLogger


def steps(path):
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_resume_drops_rows_logged_after_the_checkpoint(tmp_path):
    logger = MetricsLogger(tmp_path, ["jsonl"], enabled=True, console_print=lambda *a: None)
    for step in range(0, 6):  # step 0 = validation before training; crashed after logging step 5
        logger.log(step, {"x": float(step)})
    logger.start_at(4)  # the last checkpoint was step 4
    assert steps(tmp_path / "metrics.jsonl") == [0, 1, 2, 3, 4]
    logger.log(5, {"x": 50.0})
    assert steps(tmp_path / "metrics.jsonl") == [0, 1, 2, 3, 4, 5]


def test_fresh_start_moves_the_old_metrics_aside(tmp_path):
    logger = MetricsLogger(tmp_path, ["jsonl"], enabled=True, console_print=lambda *a: None)
    logger.log(1, {"x": 1.0})
    logger.start_at(0)
    assert not (tmp_path / "metrics.jsonl").exists()
    (aside,) = tmp_path.glob("metrics.before_*.jsonl")
    assert steps(aside) == [1]  # nothing is lost
    logger.log(1, {"x": 2.0})
    assert steps(tmp_path / "metrics.jsonl") == [1]
