"""A megatron-core actor (GPTModel stages, TP/PP/DP on gloo) computes the single-process update.

The global batch (8 responses of ragged length, old/reference logprobs, advantages) is built
once from the native policy. Each case loads the same HF weights into megatron stages and runs
``compute_logprobs`` and one PPO ``update`` (clipped surrogate + entropy bonus + KL loss, two
micro-batches per rank, AdamW); the reference is ``spmd_rl.trainer.actor`` on one process. We
compare the logprobs, the loss metrics, the gradient norm and every parameter after the step,
converted back to HF names (``MegatronActor.iter_hf_weights``, which every rank must run, and
which gives every rank the whole model). Tolerances cover fp32 reduction order: megatron runs
right-padded rows where the reference packs them, and sums in another order; a missing
all-reduce, a wrong normaliser or a softmax over the vocab padding moves logprobs or parameters
by 1e-3 or more (measured: 1e-2 and 3e-3 for the padding, 2e-2 for an unsynced tied copy).
"""

import importlib.util
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist

from spmd_rl.config import ActorConfig, OptimConfig
from spmd_rl.models import ModelArgs, build_model
from spmd_rl.trainer.actor import compute_logprobs, update_policy
from spmd_rl.trainer.batch import RolloutBatch
from spmd_rl.trainer.optim import build_lr_scheduler, build_optimizer
from spmd_rl.trainer.policy import PolicyModel
from tests.distributed.launcher import run_on_ranks

pytestmark = [pytest.mark.slow,  # 2-4 spawned ranks, each importing megatron-core
              pytest.mark.skipif(importlib.util.find_spec("megatron") is None
                                 or importlib.util.find_spec("megatron.core") is None,
                                 reason="needs megatron-core (pip install -e '.[megatron]')")]
torch.set_num_threads(1)

LLAMA = ModelArgs(architecture="LlamaForCausalLM", model_type="llama", vocab_size=96, hidden_size=32,
                  intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
# Tied, q/k/v bias, and a vocabulary that tp=2 must pad (97 -> 98): the padded row would add
# exp(0 - max) to every softmax if it were not cut off.
QWEN2_TIED = ModelArgs(architecture="Qwen2ForCausalLM", model_type="qwen2", vocab_size=97, hidden_size=32,
                       intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                       tie_word_embeddings=True, attention_bias=True)
# Per-head q/k RMSNorm: its replicated weights meet 1/tp of the heads (partial gradients over tp)
QWEN3 = LLAMA.replace(architecture="Qwen3ForCausalLM", model_type="qwen3", qk_norm=True)
# Mixture of experts: top-2 of 4 experts without renormalisation, layer 1 dense (mlp_only_layers)
QWEN3_MOE = QWEN3.replace(architecture="Qwen3MoeForCausalLM", model_type="qwen3_moe", num_experts=4,
                          num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=False, moe_layers=(0,))
MIXTRAL = LLAMA.replace(architecture="MixtralForCausalLM", model_type="mixtral", num_experts=4, num_experts_per_tok=2,
                        moe_intermediate_size=64, moe_layers=(0, 1))
# Adam's eps is raised from 1e-8 as in test_model_parallel.py: a gradient element at the 1e-9
# noise floor (where reduction order alone decides its value) could otherwise take a full
# lr-sized step either way.
OPTIM = OptimConfig(lr=1e-2, weight_decay=0.1, grad_clip=0.5, eps=1e-4)
ROWS, MICRO_BATCHES = 8, 2
ACTOR = ActorConfig(optim=OPTIM, ppo_mini_batch_size=ROWS, entropy_coeff=0.01, use_kl_loss=True, kl_loss_coef=0.1,
                    clip_ratio_low=0.1, clip_ratio_high=0.1)
SCALE_FACTOR = 8
LOGPROB_ATOL, PARAM_ATOL, PARAM_RTOL = 1e-5, 3e-6, 1e-5

# name -> (model, tp, pp, world size, activation recompute, compute dtype, distributed optimizer);
# dp = world / (tp * pp)
CASES = {
    "tp2_pp2": (LLAMA, 2, 2, 4, False, None, False),
    "tp2_tied_padded_vocab": (QWEN2_TIED, 2, 1, 2, False, None, False),
    "dp2_pp2_tied": (QWEN2_TIED, 1, 2, 4, False, None, False),
    "tp2_pp2_recompute": (LLAMA, 2, 2, 4, True, None, False),  # every layer recomputed in the backward
    # bf16 mixed precision (autocast over the fp32 parameters), recomputed under the same autocast
    "tp2_pp2_bf16_recompute": (LLAMA, 2, 2, 4, True, torch.bfloat16, False),
    # ZeRO-1: AdamW state sharded over dp (the tied copies' gradient sum, TP-replicated norms)
    "dp2_pp2_tied_distributed_optimizer": (QWEN2_TIED, 1, 2, 4, False, None, True),
    "dp2_tp2_distributed_optimizer": (LLAMA, 2, 1, 4, False, None, True),
    "tp2_qwen3_qk_norm": (QWEN3, 2, 1, 2, False, None, False),
    "tp2_qwen3_qk_norm_distributed_optimizer": (QWEN3, 2, 1, 2, False, None, True),
    # mixture of experts (megatron's MoELayer, allgather dispatcher): experts whole on every rank
    # (ep=1; the sharded AdamW state covers them too), or split over ep ranks of each dp group,
    # whose micro-batches are then padded to a common shape; with pipeline stages
    "moe_mixtral_pp2": (MIXTRAL, 1, 2, 2, False, None, False),
    "moe_mixtral_dp2_distributed_optimizer": (MIXTRAL, 1, 1, 2, False, None, True),
    "moe_qwen3_dp2_ep2": (QWEN3_MOE, 1, 1, 2, False, None, False),
    # stage 1 has no sparse layer, yet joins the experts' norm sum (the sharded AdamW state)
    "moe_qwen3_dp2_ep2_pp2_distributed_optimizer": (QWEN3_MOE, 1, 2, 4, False, None, True),
    # the AdamW state: dense ranges over dp=4, the experts' over the 2 ranks holding the same ones
    "moe_mixtral_dp4_ep2_distributed_optimizer": (MIXTRAL, 1, 1, 4, False, None, True),
}
EXPERT_PARALLEL = {"moe_qwen3_dp2_ep2": 2, "moe_qwen3_dp2_ep2_pp2_distributed_optimizer": 2,  # case -> ep (default 1)
                   "moe_mixtral_dp4_ep2_distributed_optimizer": 2}


def native_policy(args: ModelArgs, device: str = "cpu") -> PolicyModel:
    return PolicyModel(build_model(None, args=args, seed=0, device=device))


def global_batch(args: ModelArgs) -> RolloutBatch:
    """4 prompts x 2 responses; old logprobs are the policy's own, shifted so the ratio clips."""
    g = torch.Generator().manual_seed(0)
    prompts, responses = [], []
    for _ in range(ROWS // 2):
        prompt = torch.randint(0, args.vocab_size, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist()
        for _ in range(2):
            prompts.append(prompt)
            length = int(torch.randint(1, 8, (1,), generator=g))
            responses.append(torch.randint(0, args.vocab_size, (length,), generator=g).tolist())
    width = max(map(len, responses))
    mask = torch.zeros(ROWS, width)
    for i, r in enumerate(responses):
        mask[i, : len(r)] = 1
    batch = RolloutBatch(prompt_ids=prompts, response_ids=responses, group_index=torch.arange(ROWS) // 2,
                         response_mask=mask, rollout_logprobs=torch.zeros(ROWS, width), finish_reasons=["stop"] * ROWS)
    logprobs = compute_logprobs(native_policy(args), batch, 1.0, ROWS, "cpu")
    batch.old_logprobs = (logprobs + 0.15 * torch.randn(ROWS, width, generator=g)) * mask
    batch.ref_logprobs = (logprobs + 0.3 * torch.randn(ROWS, width, generator=g)) * mask
    batch.advantages = torch.randn(ROWS, 1, generator=g).expand(ROWS, width) * mask
    return batch


def _worker(rank, world_size, args, tp, pp, recompute, compute_dtype, distributed, batch, out_path, ep=1):
    from megatron.core import parallel_state as ps

    from spmd_rl.models.megatron.backend import build_actor
    from spmd_rl.models.megatron.policy import compute_logprobs as megatron_logprobs
    from spmd_rl.models.megatron.policy import update

    hf_state = build_model(None, args=args, seed=0).state_dict()
    actor = build_actor(args, tp, pp, ep=ep, seed=0, params_dtype=torch.float32, hf_state=hf_state,
                        recompute=recompute, compute_dtype=compute_dtype)
    if args.is_moe:  # each rank holds its share of the experts
        experts = {n for n, _ in actor.model.named_parameters() if "local_experts" in n and n.endswith("linear_fc2.weight")}
        per_stage = args.num_layers // pp
        sparse = [i for i in args.moe_layers if i // per_stage == actor.pp_rank]
        assert len(experts) == len(sparse) * args.num_experts // ep, experts
    matmul_dtypes = set()  # what the projections computed in
    actor.model.decoder.layers[0].self_attention.linear_qkv.register_forward_hook(
        lambda _m, _i, out: matmul_dtypes.add(out[0].dtype))
    # Calls of this stage's first MLP: a recomputed layer runs it again in the backward (a pre-hook:
    # the recompute stops as soon as the last saved tensor is rebuilt, before the MLP returns).
    calls = []
    actor.model.decoder.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    share = ROWS // dp_size
    mine = batch.select(range(dp_rank * share, (dp_rank + 1) * share))
    cfg = _with_micro(ACTOR, share // MICRO_BATCHES)
    logprobs = megatron_logprobs(actor, mine, 1.0, share // MICRO_BATCHES)
    optimizer = build_optimizer(actor.model, OPTIM)
    if distributed:
        from torch.distributed.device_mesh import init_device_mesh

        from spmd_rl.models.megatron.distributed_optimizer import ShardedAdamW, expert_parallel_groups

        # megatron's rank order (tp fastest, then dp, then pp), as the trainer's ParallelDims
        mesh = init_device_mesh("cpu", (pp, dp_size, tp), mesh_dim_names=("pp", "dp", "tp"))
        optimizer = ShardedAdamW(actor.model, OPTIM, mesh["dp"], tp_rank=actor.tp_rank,
                                 skip_tied_copy=actor.tied_copy, **expert_parallel_groups(actor, "cpu"))
        # this rank's ranges only: of the experts over the dp / ep ranks that hold the same ones
        numel = {True: 0, False: 0}
        for name, p in actor.model.named_parameters():
            numel[ep > 1 and "local_experts" in name] += p.numel()
        ranges = -(-numel[False] // dp_size) + (-(-numel[True] // (dp_size // ep)) if ep > 1 else 0)
        assert sum(b.shard.numel() for b in optimizer.buckets) == ranges
    scheduler = build_lr_scheduler(optimizer, OPTIM, total_steps=1)
    metrics = update(actor, optimizer, scheduler, mine, cfg, temperature=1.0, mini_batch_size=share,
                     scale_factor=SCALE_FACTOR)
    # logprobs + update forwards, one per micro-batch each, + the backward's recompute
    assert len(calls) == MICRO_BATCHES * (3 if recompute else 2), len(calls)
    assert matmul_dtypes == {compute_dtype or torch.float32}, matmul_dtypes
    params = {name: t.clone() for name, t in actor.iter_hf_weights()}  # collective: every rank
    checksum = [(name, t.double().sum().item()) for name, t in params.items()]
    gathered = [None] * world_size
    dist.all_gather_object(gathered, (dp_rank, logprobs, metrics, checksum))
    if rank == 0:
        # every rank of a data-parallel group (all TP and PP ranks) must agree, and every rank
        # (whichever stage it trains) must have received the same full model
        for r, lp, m, sums in gathered:
            first = next(g for g in gathered if g[0] == r)
            assert torch.equal(lp, first[1]) and m == first[2], f"ranks of dp group {r} disagree"
            assert sums == checksum, "iter_hf_weights gave ranks different models"
        by_dp = {r: (lp, m) for r, lp, m, _ in gathered}
        mean = {k: sum(by_dp[r][1][k] for r in by_dp) / dp_size for k in metrics}  # the trainer's mean over dp
        width = batch.response_mask.shape[1]  # a dp share's rows may all be shorter than the batch's longest
        logprobs = [torch.nn.functional.pad(by_dp[r][0], (0, width - by_dp[r][0].shape[1])) for r in sorted(by_dp)]
        torch.save({"logprobs": torch.cat(logprobs), "metrics": mean,
                    "params": params}, out_path)
    dist.barrier()


def _with_micro(cfg: ActorConfig, micro: int) -> ActorConfig:
    return replace(cfg, micro_batch_size_per_device=micro)


def reference(args: ModelArgs, batch: RolloutBatch, device: str = "cpu") -> dict:
    """The native policy's logprobs, update metrics and parameters (on the CPU) on ``device``."""
    policy = native_policy(args, device)
    logprobs = compute_logprobs(policy, batch, 1.0, ROWS, device).cpu()
    optimizer = build_optimizer(policy, OPTIM)
    scheduler = build_lr_scheduler(optimizer, OPTIM, total_steps=1)
    metrics = update_policy(policy, optimizer, scheduler, batch, _with_micro(ACTOR, ROWS // MICRO_BATCHES),
                            temperature=1.0, mini_batch_size=ROWS, scale_factor=SCALE_FACTOR, dp_group=None,
                            dp_size=1, device=device)
    params = {k: v.detach().cpu().clone() for k, v in policy.decoder.state_dict().items()}
    if args.tie_word_embeddings:
        params.pop("lm_head.weight")  # the tied copy: HF weights of a tied model carry only the embedding
    return {"logprobs": logprobs, "metrics": metrics, "params": params}


@pytest.mark.parametrize("case", sorted(CASES))
def test_megatron_update_equals_single_process(tmp_path, process_group, case):
    args, tp, pp, world_size, recompute, compute_dtype, distributed = CASES[case]
    batch = global_batch(args)
    out = tmp_path / "out.pt"
    run_on_ranks(_worker, world_size, args, tp, pp, recompute, compute_dtype, distributed, batch, str(out),
                 EXPERT_PARALLEL.get(case, 1))
    got = torch.load(out, weights_only=True)
    ref = reference(args, batch)
    if compute_dtype is not None:
        assert_close_in_bf16(got, ref, args)
        return

    assert (got["logprobs"] - ref["logprobs"]).abs().max() < LOGPROB_ATOL
    norm, ref_norm = got["metrics"]["actor/grad_norm"], ref["metrics"]["actor/grad_norm"]
    assert ref_norm > ACTOR.optim.grad_clip and abs(norm - ref_norm) < 1e-5 * ref_norm  # clipping is active
    for key in ("actor/pg_loss", "actor/kl_loss", "actor/entropy"):  # globally normalised: split-invariant
        assert abs(got["metrics"][key] - ref["metrics"][key]) < 1e-5, key
    assert sorted(got["params"]) == sorted(ref["params"])
    for name, value in ref["params"].items():
        assert torch.allclose(got["params"][name], value, atol=PARAM_ATOL, rtol=PARAM_RTOL), name
    initial = build_model(None, args=args, seed=0).state_dict()
    assert max((ref["params"][k] - initial[k]).abs().max().item() for k in ref["params"]) > 1e-3


def assert_close_in_bf16(got: dict, ref: dict, args: ModelArgs) -> None:
    """bf16 mixed precision against the fp32 reference: bf16 rounding (2^-8 relative) moves
    logprobs by ~1e-3 and the gradient by ~1e-4 relative (measured on tp2_pp2: 1.3e-3, 1.2e-4);
    Adam's step, which divides by the gradient's magnitude, turns that into a ~1.5 % difference
    of the whole update (L2). A missing cast (fp32 math) gives 1e-6; a wrong gradient, 1e-1 or more."""
    assert (got["logprobs"] - ref["logprobs"]).abs().max() < 5e-3
    norm, ref_norm = got["metrics"]["actor/grad_norm"], ref["metrics"]["actor/grad_norm"]
    assert abs(norm - ref_norm) < 1e-3 * ref_norm
    for key in ("actor/pg_loss", "actor/kl_loss", "actor/entropy"):
        assert abs(got["metrics"][key] - ref["metrics"][key]) < 1e-3, key
    initial = build_model(None, args=args, seed=0).state_dict()
    error = sum(((got["params"][k] - ref["params"][k]) ** 2).sum() for k in ref["params"]).sqrt()
    update = sum(((ref["params"][k] - initial[k]) ** 2).sum() for k in ref["params"]).sqrt()
    assert 1e-4 < error / update < 5e-2, (error / update).item()  # bf16 did run, and the update is the same
