"""End to end under model parallelism: torchrun SFT and GRPO runs with ``parallel.tp=2`` /
``parallel.sp=2`` on 2 ranks log the same metrics as the 1-rank run, save DCP checkpoints of the
2-D sharded state and resume from them."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.distributed.test_train_e2e import REPO, run, torchrun

torch.set_num_threads(1)
pytestmark = pytest.mark.slow

COMPARED = ["val/response_length/mean", "rollout/generated_tokens", "actor/pg_loss", "actor/grad_norm", "actor/entropy", "critic/score/mean", "response_length/mean"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("mp")
    run([sys_python(), "-m", "spmd_rl.data.prepare.addition", "--out", str(root / "data"), "--num-train", "64",
         "--num-test", "8", "--max-digits", "2", "--tokenizer-out", str(root / "init")], REPO)
    run([sys_python(), str(REPO / "examples/make_tiny_model.py"), "--tokenizer", str(root / "init"),
         "--out", str(root / "init"), "--hidden-size", "32", "--layers", "2"], REPO)
    # The 3-step SFT model never answers right: a reward that varies within each group gives the
    # compared updates a policy-gradient term, not only the entropy bonus.
    (root / "reward.py").write_text("def compute_score(data_source, solution_str, ground_truth, extra_info=None):\n"
                                    "    return (len(solution_str) % 4) / 3\n")
    return root


def sys_python():
    import sys

    return sys.executable


def sft(root, name, nproc, *extra):
    out = root / name
    run(torchrun("spmd_rl.sft", nproc, "--config", str(REPO / "configs/sft_addition.yaml"),
                 f"model.path={root / 'init'}", f"data.train_files=[{root / 'data/sft_train.parquet'}]",
                 "data.train_batch_size=8", "data.micro_batch_size_per_gpu=4", "trainer.total_steps=3",
                 f"trainer.output_dir={out}", "logging.progress_bar=false", *extra), REPO)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def grpo(root, name, nproc, steps, *extra):
    run_dir = root / name
    run(torchrun("spmd_rl.train", nproc, "--config", str(REPO / "configs/grpo_addition.yaml"),
                 f"model.path={root / 'sft1' / 'model'}", f"data.train_files=[{root / 'data/train.parquet'}]",
                 "data.train_batch_size=4", "actor.ppo_mini_batch_size=2", "actor.micro_batch_size_per_device=4",
                 "rollout.n=4", f"trainer.total_steps={steps}", f"trainer.run_dir={run_dir}", "trainer.test_freq=2",
                 f"data.val_files=[{root / 'data/test.parquet'}]", "rollout.val_n=2",
                 "trainer.val_before_train=false", "trainer.save_freq=1", "trainer.save_hf_at_end=false",
                 "trainer.device=cpu", "actor.entropy_coeff=0.1", f"reward.custom_function.path={root / 'reward.py'}",
                 *extra), REPO)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference_sft(root):
    """The 1-rank SFT run; its model is also the GRPO runs' starting point."""
    return sft(root, "sft1", 1)


def test_sft_with_tp_and_sp_matches_one_rank(root, reference_sft):
    reference = reference_sft
    # model.compile: SFT used to ignore it (the blocks now compile, with the same numbers)
    for name, extra in (("sft_tp2", "parallel.tp=2"), ("sft_sp2", "parallel.sp=2"), ("sft_compiled", "model.compile=true")):
        rows = sft(root, name, 2, extra)
        for got, ref in zip(rows, reference, strict=True):
            assert got["train/loss"] == pytest.approx(ref["train/loss"], rel=1e-5), name
            assert got["train/grad_norm"] == pytest.approx(ref["train/grad_norm"], rel=1e-4), name


@pytest.fixture(scope="module")
def reference_grpo(root, reference_sft):
    return grpo(root, "grpo1", 1, 2)


def assert_same_run(rows, reference):
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["actor/grad_norm"] > 1e-3 for r in reference)  # the compared updates are not no-ops
    assert all(abs(r["actor/pg_loss"]) > 1e-4 for r in reference)  # ... and have a policy-gradient term
    for got, ref in zip(rows, reference, strict=True):
        for key in COMPARED:
            if key in ref:  # validation runs on even steps only
                assert got[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), key
    assert "val/response_length/mean" in rows[1]  # validation ran and matched


def test_grpo_with_tp_matches_one_rank_and_resumes(root, reference_grpo):
    rows = grpo(root, "grpo_tp2", 2, 2, "parallel.tp=2")
    assert_same_run(rows, reference_grpo)
    # Resume the tp=2 run from its step-2 checkpoint (2-D sharded parameters and optimizer state).
    resumed = grpo(root, "grpo_tp2", 2, 3, "parallel.tp=2")
    assert [r["step"] for r in resumed] == [1, 2, 3]
    assert Path(root / "grpo_tp2" / "checkpoints" / "step_000003").is_dir()


@pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("c++") is None,
                    reason="torch.compile's CPU backend (inductor) needs a C++ compiler: no gcc/c++ found")
def test_grpo_with_tp_and_compiled_blocks_matches_one_rank(root, reference_grpo):
    """Micro-batches of changing token counts recompile the blocks with dynamic shapes, and the
    embedding's gradient crosses into the first compiled block."""
    rows = grpo(root, "grpo_tp2_compiled", 2, 2, "parallel.tp=2", "model.compile=true")
    assert_same_run(rows, reference_grpo)
