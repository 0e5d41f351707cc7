"""Failure handling inside a step: slow reward functions and non-finite gradients."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from spmd_rl.config import OptimConfig
from spmd_rl.errors import UserError
from spmd_rl.rewards.scorer import RewardScorer
from spmd_rl.trainer.actor import update_metrics
from spmd_rl.trainer.optim import build_lr_scheduler, optimizer_step
from spmd_rl.trainer.ppo import PPOTrainer
from tests.distributed.launcher import run_on_ranks

torch.set_num_threads(1)


def slow_then_fine(data_source, solution_str, ground_truth, extra_info=None):
    if solution_str == "hang":
        while True:  # a pathological regex/sympy call, as seen in math graders
            pass
    return 1.0


def test_reward_call_over_the_timeout_scores_zero_and_is_counted():
    scorer = RewardScorer(slow_then_fine, timeout_s=0.2)
    result = scorer.score(["s"] * 3, ["ok", "hang", "ok"], ["x"] * 3)
    assert result.scores == [1.0, 0.0, 1.0]
    assert scorer.num_timeouts == 1 and scorer.num_errors == 1


def _nan_step(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = torch.nn.Linear(4, 2)
    fully_shard(model, mesh=init_device_mesh("cpu", (world_size,)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = build_lr_scheduler(optimizer, OptimConfig(lr=0.1, warmup_steps=10), total_steps=10)
    before = [p.full_tensor().clone() for p in model.parameters()]
    # only rank 0 sees a NaN: the global norm is NaN on every rank, so all ranks skip together
    x = torch.full((1, 4), float("nan") if rank == 0 else 1.0)
    model(x).sum().backward()
    norm = optimizer_step(model, optimizer, scheduler, grad_clip=1.0)
    assert math.isnan(norm)
    assert all(torch.equal(b, p.full_tensor()) for b, p in zip(before, model.parameters()))
    assert scheduler.last_epoch == 1  # the schedule still advanced
    assert all(p.grad is None for p in model.parameters())  # and the bad gradients are gone
    model(torch.ones(1, 4)).sum().backward()
    assert math.isfinite(optimizer_step(model, optimizer, scheduler, grad_clip=1.0))
    assert not torch.equal(before[0], next(model.parameters()).full_tensor())  # a finite step applies


def test_nonfinite_gradient_skips_the_optimizer_step_on_every_rank():
    run_on_ranks(_nan_step, 2)


def test_update_metrics_average_over_steps_finite_norms_and_count_skips():
    m = update_metrics({"actor/pg_loss": 0.9}, [1.0, float("nan"), 3.0], [1e-3, 2e-3, 3e-3], "actor")
    assert m == pytest.approx({"actor/pg_loss": 0.3, "actor/grad_norm": 2.0, "actor/nonfinite_skips": 1.0,
                               "actor/lr": 2e-3})
    m = update_metrics({}, [float("inf")], [1e-3], "critic")
    assert math.isnan(m["critic/grad_norm"]) and m["critic/nonfinite_skips"] == 1.0


def test_run_stops_after_max_nonfinite_steps_in_a_row():
    trainer = PPOTrainer.__new__(PPOTrainer)
    trainer.cfg = SimpleNamespace(trainer=SimpleNamespace(max_nonfinite_steps=2))
    trainer.c = SimpleNamespace(checkpointer=SimpleNamespace(latest=lambda: "runs/x/checkpoints/step_000004"))
    trainer.nonfinite_streak, trainer.step = 0, 5

    def step(metrics):  # as _fit: count (a checkpoint of this step saves the count), log, then stop
        trainer._count_nonfinite(metrics)
        trainer._stop_if_nonfinite()

    step({"actor/nonfinite_skips": 1.0})
    step({"actor/nonfinite_skips": 0.0})  # a good step resets the streak
    step({"critic/nonfinite_skips": 1.0})
    assert trainer.nonfinite_streak == 1
    with pytest.raises(UserError, match=r"2 steps in a row had NaN/Inf gradients .* last checkpoint: runs/x/checkpoints/step_000004"):
        step({"actor/nonfinite_skips": 2.0})


def test_nonfinite_streak_is_counted_before_the_checkpoint_of_its_step(process_group, tmp_path):
    """A checkpoint of step k holds step k's streak: a run resumed from it stops where the
    uninterrupted run would (it used to hold step k-1's and stopped a step late, or never)."""
    from tests.distributed.tiny_setup import make_tiny_setup
    from tests.unit.test_engine_shares_trainer_weights import tiny_run

    root = make_tiny_setup(tmp_path, num_train=16)
    huge = root / "huge.py"  # an overflowing reward: every update's gradient is non-finite
    huge.write_text("def compute_score(data_source, solution_str, ground_truth, extra_info=None):\n"
                    "    return 3e38 * (1 + len(solution_str) % 2)\n")
    with pytest.raises(UserError, match=r"^3 steps in a row had NaN/Inf gradients \(up to step 3\)"):
        tiny_run(root, "nan", "trainer.total_steps=4", "trainer.save_freq=1", "trainer.max_nonfinite_steps=3",
                 f"reward.custom_function.path={huge}", "algorithm.norm_adv_by_std_in_grpo=false")
    saved = [torch.load(root / "runs" / "nan" / "checkpoints" / f"step_00000{k}" / "trainer_state.pt",
                        weights_only=True)["nonfinite_streak"] for k in (1, 2, 3)]
    assert saved == [1, 2, 3]


def test_logged_actor_lr_is_the_mean_rate_of_the_update_steps(process_group):
    """``actor/lr`` is the rate the update's optimizer steps used (verl logs the step's rate,
    read before its scheduler steps), not the next update's."""
    from spmd_rl.config import ActorConfig
    from spmd_rl.models import build_model
    from spmd_rl.trainer.actor import update_policy
    from spmd_rl.trainer.batch import build_rollout_batch
    from spmd_rl.trainer.optim import build_optimizer
    from spmd_rl.trainer.policy import PolicyModel
    from spmd_rl.rollout.types import Completion
    from tests.unit.test_rollout import tiny_args

    optim = OptimConfig(lr=2e-4, warmup_steps=3)
    policy = PolicyModel(build_model(None, args=tiny_args(), seed=0))
    optimizer = build_optimizer(policy, optim)
    scheduler = build_lr_scheduler(optimizer, optim, total_steps=10)
    batch = build_rollout_batch([[1, 2]] * 4, [[Completion([3, 4], [0.0, 0.0], "stop")] for _ in range(4)])
    batch.old_logprobs = torch.zeros(4, 2)
    batch.advantages = torch.tensor([[1.0], [-1.0], [1.0], [-1.0]]).expand(4, 2).contiguous()
    cfg = ActorConfig(optim=optim, ppo_mini_batch_size=2, micro_batch_size_per_device=2)
    metrics = update_policy(policy, optimizer, scheduler, batch, cfg, temperature=1.0, mini_batch_size=2,
                            scale_factor=2, dp_group=None, dp_size=1, device="cpu")
    assert metrics["actor/lr"] == pytest.approx(2e-4 * (1 / 3 + 2 / 3) / 2)  # two optimizer steps of warmup
