"""Resume edge cases of the RL loop (torchrun, CPU): a checkpoint taken exactly at an epoch
boundary, resuming on a different number of ranks, and resuming from an older checkpoint.

Every run here trains on an 8-prompt file with ``data.train_batch_size=4``, so an epoch is 2 steps.
A reward function that wraps the built-in one writes down the ``extra_info.index`` of every
training prompt it scores, which makes "which prompts did step k use" observable without
touching the trainer.
"""

import shutil
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from tests.distributed.test_train_e2e import REPO, grpo_args, read_metrics, run, sft_model, torchrun  # noqa: F401

torch.set_num_threads(1)

pytestmark = pytest.mark.slow

NUM_PROMPTS, BATCH, N = 8, 4, 4  # grpo_args: data.train_batch_size=4, rollout.n=4
# Wall-clock numbers differ between any two runs; the engine's counters are per-rank means
# (blocks, steps and tokens of one rank's share), which change with the world size.
VOLATILE = ("timing_s/", "perf/", "rollout/num_", "rollout/peak_blocks", "rollout/prefix_hit", "rollout/generated")

RECORDING_REWARD = '''\
import os
from pathlib import Path

from spmd_rl.rewards.default import compute_score as builtin_score


def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    """The built-in score; also appends this rank's scored prompt index to $PROMPT_RECORD_DIR."""
    path = Path(os.environ["PROMPT_RECORD_DIR"]) / f"rank{os.environ['RANK']}.txt"
    with open(path, "a") as f:
        f.write(f"{extra_info['split']} {extra_info['index']}\\n")
    return builtin_score(data_source, solution_str, ground_truth, extra_info)
'''


@pytest.fixture(scope="module")
def small(sft_model):
    """The 8-prompt training file and the recording reward, next to the SFT-ed model."""
    root = sft_model
    pq.write_table(pq.read_table(root / "data/train.parquet").slice(0, NUM_PROMPTS), root / "small_train.parquet")
    (root / "recording_reward.py").write_text(RECORDING_REWARD)
    return root


def rl(root: Path, run_dir: Path, nproc: int, steps: int, resume: str, record: Path, *extra: str):
    """One torchrun RL run on the small file; returns its stdout."""
    record.mkdir(parents=True)
    args = grpo_args(root, steps, f"data.train_files=[{root / 'small_train.parquet'}]", f"trainer.run_dir={run_dir}",
                     f"trainer.resume={resume}", f"reward.custom_function.path={root / 'recording_reward.py'}",
                     "trainer.val_at_end=false", *extra)
    out = run(torchrun("spmd_rl.train", nproc, *args), REPO, PROMPT_RECORD_DIR=str(record)).stdout
    assert f"{NUM_PROMPTS} training prompts, {NUM_PROMPTS // BATCH} steps/epoch" in out and f"dp={nproc}" in out
    return out


def scored_prompts(record: Path, first_step: int, nproc: int) -> dict[int, set[int]]:
    """``{step: prompt indices scored in it}`` from one run's record; every rank scores its
    ``BATCH / nproc`` prompts ``N`` times per step, in step order."""
    per_step = BATCH // nproc * N
    steps: dict[int, set[int]] = {}
    for file in sorted(record.glob("rank*.txt")):
        indices = [int(i) for split, i in (line.split() for line in file.read_text().splitlines()) if split == "train"]
        assert len(indices) % per_step == 0, (file, len(indices))
        for k in range(0, len(indices), per_step):
            steps.setdefault(first_step + k // per_step, set()).update(indices[k:k + per_step])
    return steps


def expected_batches(num_steps: int) -> dict[int, set[int]]:
    """The global batch of every step per the sampler (data.seed=0, shuffled): what an
    uninterrupted run on any number of ranks uses."""
    from spmd_rl.data.sampler import PromptSampler

    sampler = PromptSampler(NUM_PROMPTS, batch_size=BATCH, dp_rank=0, dp_size=1, seed=0)
    return {step: set(sampler.next_indices()) for step in range(1, num_steps + 1)}


def stable(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith(VOLATILE)}


def sampler_state(run_dir: Path, step: int) -> dict:
    state = torch.load(run_dir / f"checkpoints/step_{step:06d}/trainer_state.pt", weights_only=True)
    assert state["step"] == step
    return state["sampler"]


@pytest.fixture(scope="module")
def straight(small):
    """4 steps (2 epochs) on 2 ranks without interruption; checkpoints at steps 2 and 4."""
    run_dir = small / "straight"
    rl(small, run_dir, 2, 4, "never", small / "record/straight")
    return run_dir


@pytest.fixture(scope="module")
def split_at_two(small):
    """The first 2 steps (= epoch 1) on 2 ranks, checkpointed at step 2; tests resume copies of it."""
    run_dir = small / "split_at_two"
    rl(small, run_dir, 2, 2, "never", small / "record/split_at_two")
    return run_dir


def test_straight_run_follows_the_sampler(small, straight):
    # Sanity of the observation itself: the recorded prompts are the sampler's global batches,
    # epoch 2 is a new shuffle (its first batch differs from epoch 1's), and each epoch covers the file.
    expected = expected_batches(4)
    assert scored_prompts(small / "record/straight", 1, 2) == expected
    assert expected[3] != expected[1]
    assert expected[1] | expected[2] == expected[3] | expected[4] == set(range(NUM_PROMPTS))
    assert [r["step"] for r in read_metrics(straight / "metrics.jsonl")] == [1, 2, 3, 4]


def test_resume_at_an_epoch_boundary_continues_with_the_next_epoch(small, straight, split_at_two):
    """Checkpoint at step 2 = the last step of epoch 1; resuming trains epoch 2 exactly like a straight run."""
    # The step-2 checkpoint points at the start of epoch 2 (0-based epoch 1), not at the end of epoch 1.
    assert sampler_state(split_at_two, 2) == {"epoch": 1, "position": 0, "num_items": NUM_PROMPTS,
                                              "batch_size": BATCH, "seed": 0, "shuffle": True}
    run_dir = small / "epoch_boundary"
    shutil.copytree(split_at_two, run_dir)
    out = rl(small, run_dir, 2, 4, "auto", small / "record/epoch_boundary")
    assert f"resumed from {run_dir / 'checkpoints/step_000002'} at step 2" in out
    assert out.count("step 3 |") == 1 and out.count("step 4 |") == 1 and "step 1 |" not in out
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # Steps 3 and 4 used epoch 2's shuffle, the same prompts as the straight run.
    expected = expected_batches(4)
    assert scored_prompts(small / "record/epoch_boundary", 3, 2) == {3: expected[3], 4: expected[4]}
    a = {r["step"]: r for r in read_metrics(straight / "metrics.jsonl")}
    for row in rows[2:]:
        sa, sb = stable(a[row["step"]]), stable(row)
        assert sa == sb, {k: (sa[k], sb.get(k)) for k in sa if sa[k] != sb.get(k)}
    assert sampler_state(run_dir, 4) == sampler_state(straight, 4)


def test_resume_on_one_rank_then_on_two(small, straight, split_at_two):
    """2 ranks -> 1 rank (step 3) -> 2 ranks (step 4): the same global batches as the straight run."""
    run_dir = small / "mixed"
    shutil.copytree(split_at_two, run_dir)
    out = rl(small, run_dir, 1, 3, "auto", small / "record/mixed_1rank")
    assert f"resumed from {run_dir / 'checkpoints/step_000002'} at step 2" in out
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1, 2, 3]
    assert sampler_state(run_dir, 3) == {**sampler_state(split_at_two, 2), "epoch": 1, "position": 1}

    out = rl(small, run_dir, 2, 4, "auto", small / "record/mixed_2rank")
    assert f"resumed from {run_dir / 'checkpoints/step_000003'} at step 3" in out
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    expected = expected_batches(4)
    assert scored_prompts(small / "record/mixed_1rank", 3, 1) == {3: expected[3]}
    assert scored_prompts(small / "record/mixed_2rank", 4, 2) == {4: expected[4]}
    assert sampler_state(run_dir, 4) == sampler_state(straight, 4)
    # Same prompts, per-prompt sampling seeds and step-2 weights: the numbers match the straight run's.
    # On 1 rank the reductions sum in another order, so they agree to float rounding, not bit for bit
    # (different prompts or a lost optimizer state would move scores by 1/16 and losses by far more).
    a = {r["step"]: r for r in read_metrics(straight / "metrics.jsonl")}
    for row in rows[2:]:
        sa, sb = stable(a[row["step"]]), stable(row)
        assert sa.keys() == sb.keys()
        assert sb == pytest.approx(sa, rel=1e-4, abs=1e-6), {k: (sa[k], sb[k]) for k in sa if sa[k] != sb[k]}


def test_explicit_resume_from_an_older_checkpoint_drops_later_metrics(small, straight):
    """trainer.resume=<step_000002> while latest is step 4: continue from step 2, rows 3-4 are dropped."""
    run_dir = small / "older"
    shutil.copytree(straight, run_dir)
    assert (run_dir / "checkpoints/latest").read_text() == "step_000004"
    before = read_metrics(run_dir / "metrics.jsonl")
    older = run_dir / "checkpoints/step_000002"
    # Stop at step 3 this time (constant LR, so the shorter horizon changes no number): a row 4
    # in metrics.jsonl afterwards could only be the old run's.
    out = rl(small, run_dir, 2, 3, str(older), small / "record/older")
    assert f"resumed from {older} at step 2" in out
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[:2] == before[:2]  # kept rows are untouched, wall-clock numbers included
    assert stable(rows[2]) == stable(before[2])
    assert scored_prompts(small / "record/older", 3, 2) == {3: expected_batches(3)[3]}
    assert (run_dir / "checkpoints/latest").read_text() == "step_000003"
