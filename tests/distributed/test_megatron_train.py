"""``actor.strategy=megatron`` drives the whole RL loop and gives the FSDP run's numbers.

One reference run: the FSDP actor on one process, GRPO with a KL loss (so the frozen reference
model runs too), 2 steps. Each megatron layout runs the same config under torchrun on 2 CPU
ranks: rollouts come from the native engine fed with the GPTModel stages' gathered weights, old
and reference logprobs and the update from the stages. The same sampled tokens (equal scores
and lengths) show the engine got the same weights; loss metrics and gradient norms agree to
fp32 reduction-order noise (relative 1e-5; a missing dp sum or a wrong normaliser moves them
by 1e-3 or more) and so do the final exported HF weights. A run resumed from a megatron
checkpoint continues as the uninterrupted run, and ``python -m spmd_rl.export`` turns that
checkpoint's shards into the HF weights the run wrote itself. With PPO/GAE the value model
trains as GPTModel stages too and gives the FSDP critic's values, losses and gradient norms.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.distributed.tiny_setup import make_tiny_setup

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("megatron") is None
                                 or importlib.util.find_spec("megatron.core") is None,
                                 reason="needs megatron-core (pip install -e '.[megatron]')")]
torch.set_num_threads(1)

REWARD = '''
def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    return float(len(solution_str) % 2)
'''
EXACT = ("critic/score/mean", "response_length/mean")  # same tokens sampled
CLIPFRAC_ATOL = 1 / 150
CLOSE = ("actor/pg_loss", "actor/grad_norm", "actor/entropy", "actor/kl_loss", "actor/pg_clipfrac")
LAYOUTS = {"tp2": ["parallel.tp=2"], "pp2": ["parallel.pp=2"], "dp2": [],  # 2 ranks each
           # dp2 shards AdamW over the two ranks by default (actor.megatron.use_distributed_optimizer);
           # host offload while generating moves its flat buffers, or each parameter of the whole-state AdamW
           "dp2_offload": ["actor.offload.params=true", "actor.offload.optimizer=true", "ref.offload=true"],
           "dp2_whole_optimizer_offload": ["actor.megatron.use_distributed_optimizer=false", "actor.offload.params=true",
                                           "actor.offload.optimizer=true"],
           # token-budget micro-batches counted padded (2-3 rows of at most 16 + 5 tokens), many through 1F1B
           "pp2_token_budget": ["parallel.pp=2", "actor.max_tokens_per_micro_batch=48"]}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = make_tiny_setup(tmp_path_factory.mktemp("megatron_train"), num_train=64)
    (root / "reward.py").write_text(REWARD)
    return root


STDOUT: dict[Path, str] = {}  # what each run printed, by run_dir


def train(workdir: Path, run_dir: Path, nproc: int, *extra: str, config: str = "grpo_addition.yaml") -> list[dict]:
    result = launch(workdir, run_dir, nproc, *extra, config=config)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    STDOUT[run_dir] = result.stdout
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def launch(workdir: Path, run_dir: Path, nproc: int, *extra: str, config: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "spmd_rl.train", "--config", str(REPO / "configs" / config),
           f"model.path={workdir / 'model'}", f"data.train_files=[{workdir / 'data/train.parquet'}]",
           "data.val_files=[]", "data.train_batch_size=8", "actor.ppo_mini_batch_size=4", "rollout.n=4",
           "actor.micro_batch_size_per_device=4", "actor.use_kl_loss=true", "actor.kl_loss_coef=0.1",
           f"reward.custom_function.path={workdir / 'reward.py'}", "trainer.total_steps=2",
           f"trainer.run_dir={run_dir}", "trainer.save_freq=0", "trainer.save_at_end=false",
           "trainer.val_before_train=false", *extra]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    from spmd_rl.models.hf_io import load_state_dict

    return load_state_dict(folder)


def assert_rows_match(rows: list[dict], reference: list[dict], close: tuple[str, ...] = CLOSE, *,
                      atol: float = 1e-7) -> None:
    assert [r["step"] for r in rows] == [r["step"] for r in reference]
    for row, ref in zip(rows, reference):
        for key in EXACT:
            assert row[key] == ref[key], (row["step"], key)
        for key in close:
            # a clip fraction counts tokens: one whose ratio or value sits on the clip boundary
            # (within fp32 noise) may fall either side, one token of the ~160 per step
            tol = CLIPFRAC_ATOL if key.endswith("clipfrac") else atol
            assert row[key] == pytest.approx(ref[key], rel=1e-5, abs=tol), (row["step"], key)


@pytest.fixture(scope="module")
def fsdp_reference(workdir):
    run_dir = workdir / "runs/fsdp"
    return train(workdir, run_dir, 1), hf_weights(run_dir / "hf")


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_megatron_run_equals_the_single_process_fsdp_run(workdir, fsdp_reference, layout):
    ref_rows, ref_weights = fsdp_reference
    run_dir = workdir / f"runs/megatron_{layout}"
    rows = train(workdir, run_dir, 2, "actor.strategy=megatron", *LAYOUTS[layout])
    engine_tp = 2 if layout == "tp2" else 1  # the engine generates tensor-parallel over megatron's TP ranks
    assert f"the first pipeline stage generates each dp share, tensor-parallel over {engine_tp} rank(s)" in STDOUT[run_dir]
    assert "megatron pipeline stage" in STDOUT[run_dir] and "memory plan per rank" in STDOUT[run_dir]
    assert_rows_match(rows, ref_rows)
    if "offload" in layout:  # the fp32 parameters and, once the first step made them, AdamW's moments
        P = sum(t.numel() for t in hf_weights(workdir / "model").values())
        moments = 8 * P // 2 if layout == "dp2_offload" else 8 * P  # half of them each when sharded over dp2
        moved = [row["perf/offloaded_gb"] * 1024**3 for row in rows]
        assert moved[0] >= 4 * P and moved[1] >= 4 * P + moments, moved
    weights = hf_weights(run_dir / "hf")  # exported from the stages: gathered over TP, PP
    assert sorted(weights) == sorted(ref_weights)
    # Two Adam steps move a weight by up to 2 x lr = 4e-4; an element whose gradient sits at the
    # fp32 noise floor may take its step differently (measured: 1.1e-6 on one element of dp2).
    for name, tensor in ref_weights.items():
        torch.testing.assert_close(weights[name], tensor, rtol=0, atol=1e-5, msg=name)


def test_megatron_run_resumes_exactly(workdir, fsdp_reference):
    ref_rows, _ = fsdp_reference
    run_dir = workdir / "runs/megatron_resume"
    megatron = ["actor.strategy=megatron", "parallel.pp=2"]
    train(workdir, run_dir, 2, *megatron, "trainer.total_steps=1", "trainer.save_at_end=true")
    checkpoint = run_dir / "checkpoints/step_000001"
    saved = sorted(p.name for p in checkpoint.iterdir())
    assert saved == [".metadata", "__0_0.distcp", "__1_0.distcp", "rng_rank0.pt", "rng_rank1.pt", "trainer_state.pt"]
    # The offline export joins the saved stages into the weights the run exported itself.
    from spmd_rl.export import main as export_main

    export_main([str(checkpoint), str(workdir / "exported_step1")])
    in_run = hf_weights(run_dir / "hf")
    offline = hf_weights(workdir / "exported_step1")
    assert sorted(offline) == sorted(in_run)
    for name, tensor in in_run.items():
        assert torch.equal(offline[name], tensor), name
    # Another grid cannot take the shards' optimizer state: refused in one line, naming the way out.
    refused = launch(workdir, run_dir, 2, "actor.strategy=megatron", "parallel.tp=2", "trainer.resume=auto",
                     config="grpo_addition.yaml")
    assert refused.returncode != 0
    assert (f"checkpoint {checkpoint} holds a megatron actor split tp=1 x pp=2 but this run has actor.strategy=megatron "
            "parallel.tp=2 parallel.pp=1: resume with actor.strategy=megatron parallel.tp=1 parallel.pp=2, or export it"
            in refused.stdout + refused.stderr)
    # The optimizer state was saved sharded over dp (the default): the whole-state layout is refused.
    refused = launch(workdir, run_dir, 2, *megatron, "actor.megatron.use_distributed_optimizer=false",
                     "trainer.resume=auto", config="grpo_addition.yaml")
    assert refused.returncode != 0
    assert (f"checkpoint {checkpoint} holds the actor's AdamW state sharded over data parallel "
            "(actor.megatron.use_distributed_optimizer=true) but this run has "
            "actor.megatron.use_distributed_optimizer=false: resume with actor.megatron.use_distributed_optimizer=true"
            in refused.stdout + refused.stderr)
    rows = train(workdir, run_dir, 2, *megatron, "trainer.resume=auto")
    assert [r["step"] for r in rows] == [1, 2]  # the log continues after the resumed step
    assert_rows_match(rows[1:], ref_rows[1:])


# PPO with GAE: the value model trains too (no warmup, so the actor updates from step 1 on
# advantages the critic's values shaped). Values and the critic's update come from the stages.
PPO = ("ppo_gae_addition.yaml", "critic.warmup_steps=0", "trainer.test_freq=0", "actor.use_kl_loss=false",
       "critic.micro_batch_size_per_device=4", "trainer.device=cpu")
CRITIC_CLOSE = ("actor/pg_loss", "actor/grad_norm", "actor/entropy", "critic/vf_loss", "critic/grad_norm",
                "critic/vf_clipfrac", "critic/vpred_mean", "critic/values/mean", "critic/vf_explained_var",
                "critic/advantages/mean")


def train_ppo(workdir: Path, run_dir: Path, nproc: int, *extra: str) -> list[dict]:
    config, *overrides = PPO
    return train(workdir, run_dir, nproc, *overrides, *extra, config=config)


@pytest.fixture(scope="module")
def fsdp_ppo_reference(workdir):
    return train_ppo(workdir, workdir / "runs/fsdp_ppo", 1)


# pp2 also recomputes every layer's activations in the backward (megatron's "full" recompute)
# dp2: both AdamW states sharded over the 2 ranks, and the critic waits in host memory while generating
CRITIC_LAYOUTS = {"tp2": ["parallel.tp=2"], "dp2": ["critic.offload.params=true", "critic.offload.optimizer=true"],
                  "pp2_recompute": ["parallel.pp=2", "actor.activation_checkpointing=true",
                                    "critic.activation_checkpointing=true"]}


@pytest.mark.parametrize("layout", sorted(CRITIC_LAYOUTS))
def test_megatron_critic_equals_the_single_process_fsdp_critic(workdir, fsdp_ppo_reference, layout):
    rows = train_ppo(workdir, workdir / f"runs/megatron_ppo_{layout}", 2, "actor.strategy=megatron",
                     *CRITIC_LAYOUTS[layout])
    assert rows[0]["critic/values/mean"] == 0.0  # the zero-initialised head, as the FSDP critic's
    assert rows[1]["critic/values/mean"] != 0.0
    # On dp=2 the batch-wide advantage whitening sums in another order: step 2's pg_loss (a sum of
    # cancelling terms, -3.8e-3) moves by 1.5e-7, as much as the FSDP critic's on 2 ranks (measured:
    # FSDP dp2 3.8e-5 relative, megatron dp2 3.9e-5 with the sharded or the whole AdamW state alike).
    assert_rows_match(rows, fsdp_ppo_reference, CRITIC_CLOSE, atol=1e-6 if layout == "dp2" else 1e-7)


def test_megatron_critic_resumes_exactly(workdir, fsdp_ppo_reference):
    run_dir = workdir / "runs/megatron_ppo_resume"
    megatron = ["actor.strategy=megatron", "parallel.pp=2"]
    train_ppo(workdir, run_dir, 2, *megatron, "trainer.total_steps=1", "trainer.save_at_end=true")
    rows = train_ppo(workdir, run_dir, 2, *megatron, "trainer.resume=auto")
    assert [r["step"] for r in rows] == [1, 2]
    assert_rows_match(rows[1:], fsdp_ppo_reference[1:], CRITIC_CLOSE)


@pytest.mark.parametrize("strategy", ["fsdp", "megatron"])
def test_model_dtype_bfloat16_trains_in_bf16_on_cpu(workdir, strategy):
    # model.dtype=bfloat16 is bf16 on any device (auto is bf16 on GPU only): the engine samples in
    # bf16 and the trainer rescores in bf16 mixed precision, so their logprobs differ by bf16
    # rounding (~1e-3; fp32 on both sides stays below 1e-4, test_train_e2e.py).
    extra = ["actor.strategy=megatron", "parallel.pp=2"] if strategy == "megatron" else []
    rows = train(workdir, workdir / f"runs/bf16_{strategy}", 2 if extra else 1, "model.dtype=bfloat16", *extra)
    for row in rows:
        assert 1e-5 < row["rollout/logprob_diff_max"] < 5e-2, row["rollout/logprob_diff_max"]
        assert 0 < row["actor/grad_norm"] < float("inf")


# A Qwen3-MoE model (4 experts, top-2): its experts split over the two dp ranks (parallel.ep=2),
# so each rank routes the other's tokens through its own experts. The actor's AdamW state is
# sharded (the default): the dense part over dp=2, the experts' over the one rank holding them.
EXPERT_PARALLEL = ["actor.strategy=megatron", "parallel.ep=2"]


@pytest.fixture(scope="module")
def moe_workdir(tmp_path_factory):
    root = make_tiny_setup(tmp_path_factory.mktemp("megatron_moe"), num_train=64, experts=4)
    (root / "reward.py").write_text(REWARD)
    return root


def test_megatron_expert_parallel_run_equals_the_fsdp_run_and_resumes(moe_workdir):
    ref_rows = train(moe_workdir, moe_workdir / "runs/fsdp", 1)
    ref_weights = hf_weights(moe_workdir / "runs/fsdp/hf")
    run_dir = moe_workdir / "runs/megatron_ep2"
    train(moe_workdir, run_dir, 2, *EXPERT_PARALLEL, "trainer.total_steps=1", "trainer.save_at_end=true")
    assert "tp=1 pp=1 dp=2 ep=2 (2 experts per rank)" in STDOUT[run_dir]
    checkpoint = run_dir / "checkpoints/step_000001"
    # each ep rank's shard under its own name; the dense AdamW moments, sharded over both dp
    # ranks, once; each ep rank's experts' moments under its own name
    from spmd_rl.export import checkpoint_state_names
    from spmd_rl.export import main as export_main

    assert checkpoint_state_names(checkpoint) == [
        "actor/tp0_pp0/optim_dp_sharded", "actor/tp0_pp0_ep0/model", "actor/tp0_pp0_ep0/optim_dp_sharded_experts",
        "actor/tp0_pp0_ep1/model", "actor/tp0_pp0_ep1/optim_dp_sharded_experts"]

    export_main([str(checkpoint), str(moe_workdir / "exported_step1")])
    in_run, offline = hf_weights(run_dir / "hf"), hf_weights(moe_workdir / "exported_step1")
    assert sorted(offline) == sorted(in_run) == sorted(ref_weights)
    assert all(torch.equal(offline[name], tensor) for name, tensor in in_run.items())
    refused = launch(moe_workdir, run_dir, 2, "actor.strategy=megatron", "trainer.resume=auto", config="grpo_addition.yaml")
    assert refused.returncode != 0
    assert (f"checkpoint {checkpoint} holds a megatron actor split tp=1 x pp=1 x ep=2 but this run has "
            "actor.strategy=megatron parallel.tp=1 parallel.pp=1 parallel.ep=1: resume with actor.strategy=megatron "
            "parallel.tp=1 parallel.pp=1 parallel.ep=2" in refused.stdout + refused.stderr)
    rows = train(moe_workdir, run_dir, 2, *EXPERT_PARALLEL, "trainer.resume=auto")
    assert [r["step"] for r in rows] == [1, 2]
    assert_rows_match(rows, ref_rows)
    weights = hf_weights(run_dir / "hf")
    for name, tensor in ref_weights.items():
        torch.testing.assert_close(weights[name], tensor, rtol=0, atol=1e-5, msg=name)


def test_megatron_expert_parallel_critic_equals_the_fsdp_critic(moe_workdir):
    reference = train_ppo(moe_workdir, moe_workdir / "runs/fsdp_ppo", 1)
    # whole AdamW states this time (every rank holds its experts' and the dense moments)
    rows = train_ppo(moe_workdir, moe_workdir / "runs/megatron_ppo_ep2", 2, *EXPERT_PARALLEL,
                     "actor.megatron.use_distributed_optimizer=false", "critic.megatron.use_distributed_optimizer=false")
    # explained variance is 1 - var(returns - values) / var(returns): near 0 here, its fp32 noise
    # is absolute (measured 1.2e-7 at step 2), so it gets atol 1e-6; the other metrics rel 1e-5
    assert_rows_match(rows, reference, CRITIC_CLOSE, atol=1e-6)
