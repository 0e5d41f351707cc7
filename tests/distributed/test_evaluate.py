"""``spmd_rl.evaluate`` end to end on CPU: a random-init tiny model, 2 ranks, 3 samples per prompt."""

import json
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

from tests.distributed.test_train_e2e import REPO, run, torchrun  # noqa: E402
from tests.distributed.tiny_setup import make_tiny_setup  # noqa: E402

pytestmark = pytest.mark.slow

N = 3
# A reward with both outcomes on a random model's output: 1 for an even number of characters.
REWARD = """
def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    return float(len(solution_str.strip()) % 2 == 0)
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = make_tiny_setup(tmp_path_factory.mktemp("eval"))
    (root / "reward.py").write_text(REWARD)
    # No data.train_files: evaluation must not need them.
    (root / "eval.yaml").write_text(
        f"model:\n  path: {root / 'model'}\n"
        f"data:\n  val_files: [{root / 'data/test.parquet'}]\n  max_prompt_length: 16\n  max_response_length: 2\n"
        f"rollout:\n  val_n: {N}\n  val_temperature: 1.0\n  top_k: 3\n"
        f"reward:\n  custom_function:\n    path: {root / 'reward.py'}\n"
        "trainer:\n  device: cpu\n  seed: 7\n")
    return root


def evaluate_args(root, run_dir, *extra):
    return ["--config", str(root / "eval.yaml"), f"trainer.run_dir={run_dir}", *extra]


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def recompute(rows):
    """mean/maj/best over prompts, written independently of spmd_rl.trainer.eval_metrics."""
    by_prompt = {}
    for r in rows:
        by_prompt.setdefault(r["index"], []).append(r)
    mean = maj = best = 0.0
    for rs in by_prompt.values():
        scores = [r["score"] for r in rs]
        votes = [r["answer"] for r in rs if r["answer"] is not None]
        top = max(votes, key=lambda a: (votes.count(a), -votes.index(a))) if votes else None
        mean += sum(scores) / len(scores)
        best += max(scores)
        picked = [r["score"] for r in rs if r["answer"] == top]
        maj += sum(picked) / len(picked)
    k = len(by_prompt)
    return mean / k, maj / k, best / k


def test_two_ranks_write_generations_and_metrics_deterministically(setup):
    root = setup
    out = run(torchrun("spmd_rl.evaluate", 2, *evaluate_args(root, root / "two")), REPO).stdout
    assert "data_source" in out and f"maj@{N}" in out  # the table

    rows = read_jsonl(root / "two/eval/generations.jsonl")
    num_prompts = 8  # make_tiny_setup writes 8 test prompts, all shorter than max_prompt_length
    assert len(rows) == num_prompts * N
    assert [r["index"] for r in rows] == [i for i in range(num_prompts) for _ in range(N)]
    assert set(rows[0]) == {"index", "data_source", "prompt", "response", "score", "answer", "response_length"}
    assert {r["score"] for r in rows} <= {0.0, 1.0}
    assert all(1 <= r["response_length"] <= 2 for r in rows)

    summary = json.loads((root / "two/eval/metrics.json").read_text())
    assert summary["n"] == N and summary["num_prompts"] == num_prompts and summary["num_responses"] == len(rows)
    metrics = summary["metrics"]
    mean, maj, best = recompute(rows)
    src = "synthetic/addition"
    assert metrics[f"val-core/{src}/acc/mean@{N}"] == pytest.approx(mean, abs=1e-12)
    assert metrics[f"val-core/{src}/acc/maj@{N}"] == pytest.approx(maj, abs=1e-12)
    assert metrics[f"val-core/{src}/acc/best@{N}"] == pytest.approx(best, abs=1e-12)
    assert metrics["val-core/acc"] == pytest.approx(mean, abs=1e-12)
    assert metrics[f"val/acc/best@{N}"] == pytest.approx(best, abs=1e-12)
    assert metrics["val/response_length/mean"] == pytest.approx(sum(r["response_length"] for r in rows) / len(rows))
    assert best >= mean
    assert 0 < mean < 1  # both outcomes occur, so the comparison above is not between zeros

    # Same seed, one rank instead of two: per-prompt seeds make the file identical byte for byte.
    run([sys.executable, "-m", "spmd_rl.evaluate", *evaluate_args(root, root / "one")], REPO)
    assert (root / "one/eval/generations.jsonl").read_bytes() == (root / "two/eval/generations.jsonl").read_bytes()


def test_missing_val_files_is_one_line(setup, capsys):
    from spmd_rl.evaluate import main

    (setup / "no_val.yaml").write_text(f"model:\n  path: {setup / 'model'}\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(setup / "no_val.yaml")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: data.val_files: is required: the parquet files to evaluate on\n"
