"""One learning step (logprobs, values, advantages, critic and actor updates) does not depend on
how the global batch is split: 2 gloo ranks equal 1 rank, and micro-batch 2 equals micro-batch 8.

Every case feeds the same synthetic scored batch to :meth:`PPOTrainer.learn` and compares the
parameters after it (two optimizer steps: two mini-batches).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.distributed.launcher import run_on_ranks
from tests.distributed.tiny_setup import make_tiny_setup

torch.set_num_threads(1)

NUM_PROMPTS, N, MAX_RESPONSE = 8, 4, 6
# Parameters after two AdamW steps (lr 1e-3) agree to this; a wrong normaliser or a missing
# all-reduce moves them by ~1e-3.
ATOL = 2e-5


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return make_tiny_setup(tmp_path_factory.mktemp("invariance"))


def synthetic_batch(vocab: int):
    """NUM_PROMPTS groups of N responses with ragged lengths and 0/1 scores (fixed seed)."""
    from spmd_rl.rollout.types import Completion
    from spmd_rl.trainer.batch import build_rollout_batch

    g = torch.Generator().manual_seed(1234)
    prompts = [torch.randint(4, vocab, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
               for _ in range(NUM_PROMPTS)]
    completions = []
    for _ in prompts:
        group = []
        for _ in range(N):
            length = int(torch.randint(1, MAX_RESPONSE + 1, (1,), generator=g))
            tokens = torch.randint(4, vocab, (length,), generator=g).tolist()
            group.append(Completion(tokens, [0.0] * length, "length"))
        completions.append(group)
    batch = build_rollout_batch(prompts, completions)
    batch.scores = torch.randint(0, 2, (len(batch),), generator=g).float()
    return batch


def rows_of_rank(rank: int, world_size: int, mini_groups: int) -> list[int]:
    """The rows the sampler would give rank ``rank``: its slice of every global mini-batch."""
    from spmd_rl.data.sampler import rank_share

    return [g * N + i for g in rank_share(NUM_PROMPTS, mini_groups, rank, world_size) for i in range(N)]


def overrides(root: Path, *extra: str) -> list[str]:
    return [f"model.path={root / 'model'}", f"data.train_files=[{root / 'data/train.parquet'}]",
            f"data.train_batch_size={NUM_PROMPTS}", f"data.max_response_length={MAX_RESPONSE}",
            f"rollout.n={N}", "actor.ppo_mini_batch_size=4", "actor.optim.lr=1e-3", "actor.optim.weight_decay=0.0",
            "actor.optim.grad_clip=100.0", "trainer.device=cpu", "logging.progress_bar=false", *extra]


def learn_once(rank: int, world_size: int, root: Path, cases: dict[str, list[str]], out: Path) -> None:
    """For each case: fresh components, ``learn`` on this rank's groups, save full parameters."""
    from spmd_rl.config import Config, load_config
    from spmd_rl.distributed.init import init_parallel
    from spmd_rl.trainer.components import build_components
    from spmd_rl.trainer.ppo import PPOTrainer

    results = {}
    for name, extra in cases.items():
        cfg = load_config(Config, None, overrides(root, f"trainer.run_dir={root / 'runs' / name}", *extra))
        dims, mesh = init_parallel(cfg.parallel, torch.device("cpu"))
        trainer = PPOTrainer(cfg, build_components(cfg, dims, mesh, torch.device("cpu")))
        trainer.step = 1
        full = synthetic_batch(vocab=len(trainer.c.tokenizer))
        mine = full.select(rows_of_rank(rank, world_size, mini_groups=trainer.c.sampler.mini_batch_size))
        metrics = trainer.learn(mine)
        params = {f"actor.{k}": p.full_tensor() for k, p in trainer.c.policy.named_parameters()}
        if trainer.c.critic is not None:
            params.update({f"critic.{k}": p.full_tensor() for k, p in trainer.c.critic.named_parameters()})
        results[name] = {"params": params, "metrics": metrics}
    if rank == 0:
        torch.save(results, out)


def run_cases(root: Path, world_size: int, cases: dict[str, list[str]], tag: str) -> dict:
    out = root / f"{tag}_ws{world_size}.pt"
    run_on_ranks(learn_once, world_size, root, cases, out)
    return torch.load(out, weights_only=False)


def assert_same_params(a: dict, b: dict, atol: float = ATOL) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < atol, f"max parameter difference {worst:.3g} >= {atol}"


GRPO = ["algorithm.adv_estimator=grpo", "actor.micro_batch_size_per_device=4"]
PPO_GAE = ["algorithm.adv_estimator=gae", "critic.enable=true", "critic.optim.lr=1e-3",
           "critic.optim.weight_decay=0.0", "actor.micro_batch_size_per_device=4", "algorithm.lam=0.95"]


@pytest.fixture(scope="module")
def moe_workdir(tmp_path_factory):
    return make_tiny_setup(tmp_path_factory.mktemp("invariance_moe"), experts=4)


@pytest.mark.slow
def test_moe_model_two_ranks_equal_one_rank(moe_workdir):
    # Qwen3-MoE, 4 experts, top-2: the update (router and experts included) does not depend on the split
    cases = {"grpo_kl": GRPO + ["actor.use_kl_loss=true", "actor.kl_loss_coef=0.1"], "ppo_gae": PPO_GAE}
    one = run_cases(moe_workdir, 1, cases, "moe")
    two = run_cases(moe_workdir, 2, cases, "moe")
    for name in cases:
        assert any(".experts.3." in k for k in one[name]["params"])
        assert_same_params(one[name]["params"], two[name]["params"])
        assert two[name]["metrics"]["actor/pg_loss"] == pytest.approx(one[name]["metrics"]["actor/pg_loss"], abs=1e-6)


@pytest.mark.slow
def test_two_ranks_equal_one_rank_for_grpo_and_ppo_gae(workdir):
    cases = {"grpo": GRPO, "ppo_gae": PPO_GAE,
             # critic mini-batches of 2 prompts, the actor's of 4: the sampler deals 2-prompt chunks
             "ppo_gae_critic_mini2": PPO_GAE + ["critic.ppo_mini_batch_size=2"],
             "grpo_kl_entropy": GRPO + ["actor.use_kl_loss=true", "actor.kl_loss_coef=0.1", "actor.entropy_coeff=0.01"]}
    one = run_cases(workdir, 1, cases, "dp")
    two = run_cases(workdir, 2, cases, "dp")
    for name in cases:
        assert_same_params(one[name]["params"], two[name]["params"])
        # the reported loss is that of the global batch whatever the split
        assert two[name]["metrics"]["actor/pg_loss"] == pytest.approx(one[name]["metrics"]["actor/pg_loss"], abs=1e-6)
    # GAE whitening used global statistics: the critic moved identically too
    for name in ("ppo_gae", "ppo_gae_critic_mini2"):
        assert any(k.startswith("critic.") for k in two[name]["params"])
        assert two[name]["metrics"]["critic/vf_loss"] == pytest.approx(one[name]["metrics"]["critic/vf_loss"], abs=1e-6)
    # four critic steps instead of two: a different critic, hence different values and actor update
    critic_moved = max((one["ppo_gae"]["params"][k] - one["ppo_gae_critic_mini2"]["params"][k]).abs().max().item()
                       for k in one["ppo_gae"]["params"] if k.startswith("critic."))
    assert critic_moved > 1e-5
    # and the update did something: parameters differ from the KL/entropy variant
    assert max((one["grpo"]["params"][k] - one["grpo_kl_entropy"]["params"][k]).abs().max().item()
               for k in one["grpo"]["params"]) > 1e-6


@pytest.mark.slow
def test_micro_batch_split_does_not_change_the_update(workdir):
    modes = ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
    cases = {}
    for mode in modes:
        for micro in (2, 8):
            cases[f"{mode}/{micro}"] = ["algorithm.adv_estimator=grpo", f"actor.loss_agg_mode={mode}",
                                        f"actor.micro_batch_size_per_device={micro}"]
    results = run_cases(workdir, 1, cases, "micro")
    for mode in modes:
        assert_same_params(results[f"{mode}/2"]["params"], results[f"{mode}/8"]["params"], atol=5e-6)
