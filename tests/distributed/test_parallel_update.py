"""One full RL update under tensor, sequence and hybrid-sharded data parallelism equals one process.

Each case builds the trainer from a config (``parallel.*`` overrides), feeds its data-parallel
rank's share of the same synthetic scored batch to :meth:`PPOTrainer.learn` (old logprobs,
values, GAE advantages, critic and actor updates: two optimizer steps each) and compares every
parameter and the loss metrics with the one-rank run. The tiny model has 49 tokens, so the
vocabulary splits unevenly over tp=2 (25 + 24 rows).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.distributed.launcher import run_on_ranks
from tests.distributed.test_update_invariance import N, PPO_GAE, overrides, synthetic_batch
from tests.distributed.tiny_setup import make_tiny_setup

torch.set_num_threads(1)

# Two AdamW steps at lr 1e-3 (eps 1e-8): reduction order alone moves parameters by < 1e-6 here;
# a wrong loss scale or a missing reduction moves them by ~1e-3.
ATOL = 2e-5
METRICS = ("actor/pg_loss", "actor/entropy", "critic/vf_loss", "actor/grad_norm")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return make_tiny_setup(tmp_path_factory.mktemp("parallel_update"))


def learn_once(rank: int, world_size: int, root: Path, extra: list[str], out: Path) -> None:
    from spmd_rl.config import Config, load_config
    from spmd_rl.data.sampler import rank_share
    from spmd_rl.distributed.init import init_parallel
    from spmd_rl.trainer.components import build_components
    from spmd_rl.trainer.ppo import PPOTrainer

    cfg = load_config(Config, None, overrides(root, f"trainer.run_dir={root / 'runs' / str(world_size)}", *PPO_GAE,
                                              *extra))
    dims, mesh = init_parallel(cfg.parallel, torch.device("cpu"))
    trainer = PPOTrainer(cfg, build_components(cfg, dims, mesh, torch.device("cpu")))
    trainer.step = 1
    full = synthetic_batch(vocab=len(trainer.c.tokenizer))
    groups = rank_share(len(full) // N, 4, trainer.c.dp_rank, trainer.c.dp_size)
    metrics = trainer.learn(full.select([g * N + i for g in groups for i in range(N)]))
    params = {f"actor.{k}": p.full_tensor() for k, p in trainer.c.policy.named_parameters()}
    params.update({f"critic.{k}": p.full_tensor() for k, p in trainer.c.critic.named_parameters()})
    if rank == 0:
        torch.save({"params": params, "metrics": metrics}, out)


def run(root: Path, world_size: int, *extra: str) -> dict:
    out = root / f"ws{world_size}_{'_'.join(extra) or 'ref'}.pt".replace("/", "-")
    run_on_ranks(learn_once, world_size, root, list(extra), out)
    return torch.load(out, weights_only=False)


CASES = {
    "tp2": (2, ["parallel.tp=2"]),
    "sp2": (2, ["parallel.sp=2"]),
    "dp2_tp2": (4, ["parallel.tp=2"]),
    "hsdp_2x2": (4, ["parallel.dp_replicate=2"]),
}


@pytest.fixture(scope="module")
def reference(workdir):
    return run(workdir, 1)


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_parallel_update_equals_one_rank(workdir, reference, case):
    world_size, extra = CASES[case]
    got = run(workdir, world_size, *extra)
    assert got["params"].keys() == reference["params"].keys()
    worst = max((got["params"][k] - reference["params"][k]).abs().max().item() for k in reference["params"])
    assert worst < ATOL, f"max parameter difference {worst:.3g} >= {ATOL}"
    for key in METRICS:
        assert got["metrics"][key] == pytest.approx(reference["metrics"][key], rel=1e-4, abs=1e-6), key
    from spmd_rl.models import build_model

    initial = build_model(str(workdir / "model")).state_dict()
    moved = max((reference["params"][f"actor.decoder.{k}"] - v).abs().max().item() for k, v in initial.items()
                if f"actor.decoder.{k}" in reference["params"])  # a tied lm_head is not a separate parameter
    assert moved > 1e-4  # the update did something
