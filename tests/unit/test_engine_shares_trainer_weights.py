"""The native engine generates from the trainer's FSDP2 parameters in place when the layouts match
(one FSDP shard holding whole tensors, no TP, same dtype, no parameter offload): same storage,
same tokens as an engine over a copy, before and after a real optimizer step; a real shard is
refused; the trainer's two paths (shared / copied) log the same run; the memory plan counts no
engine copy."""

from __future__ import annotations

import copy
import json

import pytest
import torch

torch.set_num_threads(1)

from spmd_rl.config import Config, load_config  # noqa: E402
from spmd_rl.distributed.parallel_dims import ParallelDims  # noqa: E402
from spmd_rl.distributed.parallelize import apply_fsdp  # noqa: E402
from spmd_rl.models import build_model  # noqa: E402
from spmd_rl.rollout import SamplingParams, iter_full_tensors  # noqa: E402
from spmd_rl.rollout.native import NativeEngine  # noqa: E402
from spmd_rl.trainer.components import engine_can_share_weights, weightless_decoder  # noqa: E402
from spmd_rl.trainer.memory_plan import format_plan, plan_memory  # noqa: E402
from spmd_rl.trainer.policy import PolicyModel, build_scoring_inputs  # noqa: E402
from tests.unit.test_native_engine_paged import PROMPT_LENS, make_prompts, tiny_args, tokens_of  # noqa: E402

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=8)
STALE = ("share_weights_with: the trainer's {!r} is no longer the tensor the engine shares (sharded or replaced "
         "after the engine was built); build the engine without share_weights_with to copy weights instead")


def fsdp_policy(**changes):
    """``(policy, plain copy of its initial decoder)``: a tiny native decoder FSDP2-wrapped like the
    trainer's (one unit per block + the root) on a 1-rank mesh."""
    from torch.distributed.device_mesh import init_device_mesh

    decoder = build_model(None, args=tiny_args(**changes), seed=0).float()
    reference = copy.deepcopy(decoder).eval()
    return apply_fsdp(PolicyModel(decoder), init_device_mesh("cpu", (1,))), reference


def sharing_engine(policy) -> NativeEngine:
    return NativeEngine(weightless_decoder(policy.decoder), share_weights_with=policy.decoder)


def engine_over_copy(reference, policy) -> NativeEngine:
    """An engine over its own copy of the policy's current full weights."""
    engine = NativeEngine(copy.deepcopy(reference))
    engine.update_weights(iter_full_tensors(policy.decoder))
    return engine


def must_not_be_read():
    raise AssertionError("update_weights consumed the stream of a weight-sharing engine")
    yield


def adamw_step(policy, optimizer) -> None:
    """One forward + backward + AdamW step of the FSDP policy on a next-token loss."""
    prompt, response = make_prompts([6, 10], seed=9)
    logprobs, _ = policy(build_scoring_inputs([prompt], [response], "cpu"))
    (-logprobs.sum()).backward()
    optimizer.step()
    optimizer.zero_grad()


@pytest.mark.parametrize("tied", [False, True])
def test_engine_reads_the_fsdp_storage_and_follows_optimizer_steps(process_group, tied):
    from torch.distributed.tensor import DTensor

    policy, reference = fsdp_policy(tie_word_embeddings=tied)
    shell = weightless_decoder(policy.decoder)
    assert list(shell.buffers()) == []  # nothing that would stay on the meta device
    engine = NativeEngine(shell, share_weights_with=policy.decoder)
    assert engine.shares_weights
    trainer = dict(policy.decoder.named_parameters(remove_duplicate=False))
    assert all(isinstance(p, DTensor) for p in trainer.values())
    assert {n: p.data_ptr() for n, p in engine.model.named_parameters(remove_duplicate=False)} == \
        {n: p.to_local().data_ptr() for n, p in trainer.items()}
    assert (engine.model.lm_head.weight is engine.model.model.embed_tokens.weight) is tied
    prompts = make_prompts(PROMPT_LENS[:4], seed=2)
    before = tokens_of(engine.generate(prompts, GREEDY))
    assert before == tokens_of(NativeEngine(copy.deepcopy(reference)).generate(prompts, GREEDY))

    optimizer = torch.optim.AdamW(policy.parameters(), lr=3e-2)
    adamw_step(policy, optimizer)
    assert not torch.equal(trainer["model.norm.weight"].full_tensor(), reference.model.norm.weight)
    engine.update_weights(must_not_be_read())  # only checks that the storage is still shared
    after = tokens_of(engine.generate(prompts, GREEDY))
    assert after != before  # the step moved the greedy tokens: the engine sees the new weights
    assert after == tokens_of(engine_over_copy(reference, policy).generate(prompts, GREEDY))


def test_check_reshards_a_policy_left_gathered_and_catches_moved_storage(process_group):
    from torch.distributed.tensor import DTensor

    from spmd_rl.trainer.offload import HostOffload

    policy, reference = fsdp_policy()
    engine = sharing_engine(policy)
    prompts = make_prompts(PROMPT_LENS[:3], seed=5)
    with torch.no_grad():  # a forward without backward: the root and the last block stay gathered
        policy(build_scoring_inputs([[1, 2, 3]], [[4, 5]], "cpu"))
    gathered = [n for n, p in policy.decoder.named_parameters() if not isinstance(p, DTensor)]
    assert "model.norm.weight" in gathered and "model.layers.1.mlp.up_proj.weight" in gathered
    engine.update_weights(must_not_be_read())
    assert all(isinstance(p, DTensor) for p in policy.decoder.parameters())  # resharded by the check
    assert tokens_of(engine.generate(prompts, GREEDY)) == \
        tokens_of(engine_over_copy(reference, policy).generate(prompts, GREEDY))
    # Host offload re-points FSDP's storage (separate buffers, also on CPU): the engine would read stale weights.
    HostOffload([policy], device="cpu", pin_memory=False).offload()
    with pytest.raises(ValueError) as err:
        engine.update_weights(must_not_be_read())
    assert str(err.value) == STALE.format("model.embed_tokens.weight")


def test_a_dtensor_holding_a_real_shard_is_refused(process_group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    trainer = build_model(None, args=tiny_args(), seed=0).float()
    # What FSDP over 2 ranks leaves on each: the first half of the rows of a [64] norm weight.
    half = DTensor.from_local(torch.ones(32), init_device_mesh("cpu", (1,)), [Shard(0)], shape=(64,), stride=(1,))
    trainer.model.norm.weight = torch.nn.Parameter(half)
    with pytest.raises(ValueError) as err:
        NativeEngine(weightless_decoder(trainer), share_weights_with=trainer)
    assert str(err.value) == (
        "share_weights_with needs every parameter whole on this rank, but 'model.norm.weight' is sharded "
        "(local (32,) of (64,): FSDP over several ranks or TP); leave share_weights_with unset to copy weights "
        "in buckets instead")


def config(*overrides: str) -> Config:
    return load_config(Config, None, ["model.path=m", "data.train_files=[t.parquet]", *overrides])


def dims(dp_replicate=1, dp_shard=1, sp=1, tp=1) -> ParallelDims:
    return ParallelDims(dp_replicate, dp_shard, sp, tp, 1, dp_replicate * dp_shard * sp * tp)


@pytest.mark.parametrize("overrides, layout, engine_dtype, shares", [
    ([], dims(), torch.float32, True),
    ([], dims(dp_replicate=2), torch.float32, True),  # HSDP with dp_shard=1: every shard is whole
    (["actor.offload.optimizer=true"], dims(), torch.float32, True),  # only the AdamW state moves
    (["rollout.share_weights=false"], dims(), torch.float32, False),
    ([], dims(dp_shard=2), torch.float32, False),
    ([], dims(sp=2), torch.float32, False),
    ([], dims(tp=2), torch.float32, False),
    ([], dims(), torch.bfloat16, False),  # GPU default: bf16 engine over fp32 master weights
    (["actor.offload.params=true"], dims(), torch.float32, False),
    (["rollout.engine=hf"], dims(), torch.float32, False),
])
def test_engine_can_share_weights(overrides, layout, engine_dtype, shares):
    assert engine_can_share_weights(config(*overrides), layout, engine_dtype, torch.float32) is shares


def test_memory_plan_counts_no_engine_copy_when_sharing():
    args = tiny_args()
    cfg = config("rollout.max_num_seqs=2")
    copied = plan_memory(cfg, args, dims(), None, device_type="cpu")
    shared = plan_memory(cfg, args, dims(), None, device_type="cpu", engine_shares_weights=True)
    P = sum(p.numel() for p in weightless_decoder(build_model(None, args=args, seed=0)).parameters())
    assert copied.item("rollout weights").bytes == P * 4
    assert shared.item("rollout weights").bytes == 0
    assert {i.name: i.bytes for i in shared.items if i.name != "rollout weights"} == \
        {i.name: i.bytes for i in copied.items if i.name != "rollout weights"}
    assert shared.phase_bytes("generation") == copied.phase_bytes("generation") - P * 4
    assert "  rollout weights      0.000       0.000     0.000  (shares the trainer's parameters)" in \
        format_plan(shared).splitlines()


# ------------------------------------------------------------------ trainer level


def tiny_run(root, name: str, *extra: str):
    """The tiny 1-rank GRPO run (2 steps unless ``extra`` says otherwise), fitted; ``(trainer, metrics rows)``."""
    from spmd_rl.distributed.init import init_parallel
    from spmd_rl.trainer.ppo import PPOTrainer
    from tests.distributed.test_update_invariance import overrides

    run_dir = root / "runs" / name
    # Scores that differ within a group (digits in the response), so that the first update moves
    # the weights the second rollout is sampled from (the random-init model never adds right).
    reward = root / "digits.py"
    reward.write_text("def compute_score(data_source, solution_str, ground_truth, extra_info=None):\n"
                      "    return float(sum(c.isdigit() for c in solution_str))\n")
    cfg = load_config(Config, None, overrides(
        root, f"trainer.run_dir={run_dir}", f"data.val_files=[{root / 'data/test.parquet'}]", "trainer.total_steps=2",
        "trainer.save_at_end=false", "trainer.save_hf_at_end=false", "trainer.resume=never", "actor.optim.lr=3e-2",
        f"reward.custom_function.path={reward}", *extra))
    dims_, mesh = init_parallel(cfg.parallel, torch.device("cpu"))
    trainer = PPOTrainer.build(cfg, dims_, mesh, torch.device("cpu"))
    trainer.fit()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return trainer, rows


def test_trainer_shared_and_copied_weights_log_the_same_run(process_group, tmp_path, capsys):
    from tests.distributed.tiny_setup import make_tiny_setup

    root = make_tiny_setup(tmp_path, num_train=16)
    shared, shared_rows = tiny_run(root, "shared", "rollout.share_weights=true", "trainer.save_at_end=true")
    out = capsys.readouterr().out
    assert "rollout engine: generates from the trainer's own parameters" in out
    assert "(shares the trainer's parameters)" in out  # the printed memory plan counts no engine copy
    copied, copied_rows = tiny_run(root, "copied", "rollout.share_weights=false")
    assert "shares the trainer's" not in capsys.readouterr().out
    assert shared.c.engine.shares_weights is True and copied.c.engine.shares_weights is False
    assert sum(p.numel() for p in copied.c.engine.model.parameters()) > 0
    assert len(shared_rows) == len(copied_rows) == 2

    def comparable(row: dict) -> dict:
        # Wall-clock timings and perf/* (throughput and MFU from them, peak memory: a copied engine
        # holds its own weights) differ between the runs by nature; every other number must not.
        return {k: v for k, v in row.items() if not k.startswith(("timing_", "perf/"))}

    for a, b in zip(shared_rows, copied_rows):
        assert comparable(a) == comparable(b)
    assert shared_rows[0]["actor/grad_norm"] > 0  # the first update moved the weights of the second rollout
    assert any(k.startswith("val-core/") for k in shared_rows[-1])  # validation ran on the shared engine

    # Resuming loads the checkpoint into FSDP's storage in place: the engine still shares it and
    # samples from the loaded weights (the engine's logprobs are the trainer's; a stale engine is off by ~1).
    resumed, rows = tiny_run(root, "shared", "trainer.total_steps=3", "trainer.resume=auto")
    assert resumed.c.engine.shares_weights and [r["step"] for r in rows] == [1, 2, 3]
    assert rows[-1]["rollout/logprob_diff_max"] < 1e-5
