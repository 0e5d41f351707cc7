"""A rank that dies mid-step must not leave the others hanging: they exit non-zero within 60 s.

The ranks are plain processes (no torchrun agent, which would kill the survivors itself), so the
test sees what the collectives do when a peer vanishes."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from spmd_rl.distributed.init import free_port
from tests.distributed.tiny_setup import REPO, make_tiny_setup

torch.set_num_threads(1)
pytestmark = pytest.mark.slow

EXIT_LIMIT_S = 60

# Scores 0; the process of rank $DIE_RANK kills itself with SIGKILL at its $DIE_AT-th call (mid-step).
SUICIDAL_REWARD = '''
import os, signal
calls = 0
def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    global calls
    calls += 1
    if os.environ["RANK"] == os.environ.get("DIE_RANK") and calls == int(os.environ["DIE_AT"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return 0.0
'''


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = make_tiny_setup(tmp_path_factory.mktemp("rank_failure"))
    (root / "reward.py").write_text(SUICIDAL_REWARD)
    return root


def start_ranks(root: Path, run_dir: Path, **env) -> list[subprocess.Popen]:
    port = free_port()
    args = ["--config", str(REPO / "configs/grpo_addition.yaml"), f"model.path={root / 'model'}",
            f"data.train_files=[{root / 'data/train.parquet'}]", "data.val_files=[]", "data.train_batch_size=4",
            "actor.ppo_mini_batch_size=2", "rollout.n=4", "trainer.total_steps=500", f"trainer.run_dir={run_dir}",
            "trainer.val_before_train=false", "trainer.save_freq=0", "trainer.save_at_end=false",
            "trainer.save_hf_at_end=false", f"reward.custom_function.path={root / 'reward.py'}"]
    procs = []
    for rank in range(2):
        rank_env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(rank), "LOCAL_RANK": str(rank),
                    "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), **env}
        procs.append(subprocess.Popen([sys.executable, "-m", "spmd_rl.train", *args], cwd=REPO, env=rank_env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def assert_survivor_exits(survivor: subprocess.Popen, died_at: float) -> str:
    try:
        survivor.wait(timeout=EXIT_LIMIT_S - (time.monotonic() - died_at))
    except subprocess.TimeoutExpired:
        survivor.kill()
        raise AssertionError(f"the surviving rank was still running {EXIT_LIMIT_S} s after its peer died")
    output = survivor.stdout.read()
    assert survivor.returncode != 0, output[-2000:]
    return output


def test_rank_killed_mid_step_ends_the_other(setup, tmp_path):
    """Rank 1 SIGKILLs itself inside the reward of its third step; rank 0 exits non-zero."""
    procs = start_ranks(setup, tmp_path / "run", DIE_RANK="1", DIE_AT=str(3 * 4 * 2 + 1))  # 2 prompts x n=4 per step
    try:
        wait_for(lambda: procs[1].poll() is not None, 180, "rank 1 to die")
        died_at = time.monotonic()
        assert procs[1].returncode == -signal.SIGKILL
        output = assert_survivor_exits(procs[0], died_at)
        assert "Connection" in output or "closed" in output  # the collective noticed the peer, not a timeout
        assert len((tmp_path / "run/metrics.jsonl").read_text().splitlines()) == 3  # steps 1..3 done, 4 died
    finally:
        for p in procs:
            p.kill()


def test_killing_the_rendezvous_host_ends_the_other(setup, tmp_path):
    """SIGKILL rank 0 (it hosts the TCP store) from outside after two logged steps; rank 1 exits non-zero."""
    procs = start_ranks(setup, tmp_path / "run")
    metrics = tmp_path / "run/metrics.jsonl"
    try:
        wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 2, 180, "two steps")
        procs[0].send_signal(signal.SIGKILL)
        died_at = time.monotonic()
        assert_survivor_exits(procs[1], died_at)
    finally:
        for p in procs:
            p.kill()
