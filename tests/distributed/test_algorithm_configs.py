"""Every shipped algorithm config runs 3 steps under torchrun (2 CPU ranks) and logs its metrics.

The model is a random-init tiny decoder, so a stand-in reward (the parity of the response length)
gives groups with differing rewards; DAPO's dynamic sampling needs some.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.distributed.tiny_setup import make_tiny_setup

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

REWARD = '''
def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    return float(len(solution_str) % 2)
'''

COMMON_METRICS = {"actor/pg_loss", "actor/grad_norm", "actor/entropy", "critic/score/mean",
                  "critic/advantages/mean", "response_length/mean", "timing_s/step", "timing_s/update_actor"}
# What each config adds on top of the common metrics.
EXPECTED = {
    "grpo": set(),
    "drgrpo": set(),
    "rloo": set(),
    "gspo": {"actor/ppo_kl"},
    "ppo_gae": {"critic/vf_loss", "critic/vf_clipfrac", "critic/vf_explained_var", "critic/values/mean",
                "critic/returns/mean", "timing_s/values", "timing_s/update_critic"},
    "reinforce_pp": {"actor/reward_kl_penalty", "actor/reward_kl_penalty_coeff", "timing_s/ref"},
    "remax": {"timing_s/gen_baseline"},
    "dapo": {"train/num_gen_batches", "train/kept_group_frac"},
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = make_tiny_setup(tmp_path_factory.mktemp("configs"), num_train=256)
    (root / "reward.py").write_text(REWARD)
    return root


def test_every_algorithm_config_is_covered():
    shipped = {p.name.removesuffix("_addition.yaml") for p in (REPO / "configs").glob("*_addition.yaml")}
    assert shipped - {"sft"} == set(EXPECTED)


def train_cmd(workdir: Path, name: str, run_dir: Path, steps: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "spmd_rl.train", "--config", str(REPO / f"configs/{name}_addition.yaml"),
           f"model.path={workdir / 'model'}", f"data.train_files=[{workdir / 'data/train.parquet'}]",
           "data.val_files=[]", "data.train_batch_size=8", "actor.ppo_mini_batch_size=4", "rollout.n=4",
           f"reward.custom_function.path={workdir / 'reward.py'}", f"trainer.total_steps={steps}",
           f"trainer.run_dir={run_dir}", "trainer.save_freq=0", "trainer.save_hf_at_end=false",
           "trainer.val_before_train=false", *extra]


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_runs_three_steps(workdir, name):
    run_dir = workdir / "runs" / name
    extra = ["trainer.save_at_end=false"]
    if name == "ppo_gae":
        extra.append("critic.warmup_steps=2")  # the actor starts learning at step 3
    run(train_cmd(workdir, name, run_dir, 3, *extra))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row in rows:
        expected = COMMON_METRICS | EXPECTED[name]
        if name == "ppo_gae" and row["step"] <= 2:  # critic warmup: no actor update yet
            assert not any(k.startswith("actor/") for k in row), row
            expected = {k for k in expected if not k.startswith("actor/") and k != "timing_s/update_actor"}
        missing = expected - row.keys()
        assert not missing, f"{name} step {row['step']} lacks {sorted(missing)}"
        assert all(v == v for v in row.values()), f"NaN in {name} metrics: {row}"  # v != v only for NaN


def test_ppo_checkpoint_holds_the_critic_and_resumes(workdir):
    """Actor, critic, both optimizers and schedulers, and the KL controller survive a restart."""
    run_dir = workdir / "runs" / "ppo_resume"
    kl = ["algorithm.use_kl_in_reward=true", "algorithm.kl_ctrl.type=adaptive", "critic.warmup_steps=0"]
    run(train_cmd(workdir, "ppo_gae", run_dir, 2, "trainer.resume=never", *kl))
    second = run(train_cmd(workdir, "ppo_gae", run_dir, 3, "trainer.resume=auto", *kl))
    assert "resumed from" in second.stdout and "at step 2" in second.stdout
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    # the adaptive coefficient continued from its saved value instead of restarting at kl_coef
    assert rows[2]["actor/reward_kl_penalty_coeff"] != rows[0]["actor/reward_kl_penalty_coeff"]
    assert rows[2]["critic/lr"] > 0 and "critic/vf_loss" in rows[2]
