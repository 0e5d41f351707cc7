"""The megatron backend's memory plan: per-stage parameter counts equal what the HF -> GPTModel
conversion gives each (TP rank, stage), the 1F1B activation count per stage, and the one-line
refusal of a configuration that cannot fit. Pure: no megatron-core needed."""

from __future__ import annotations

import pytest
import torch

from spmd_rl.config import Config, load_config
from spmd_rl.distributed.parallel_dims import ParallelDims
from spmd_rl.errors import UserError
from spmd_rl.models import build_model
from spmd_rl.models.args import ModelArgs
from spmd_rl.models.megatron.config import padded_vocab_size
from spmd_rl.models.megatron.memory_plan import plan_megatron_memory, plan_megatron_stage, stage_param_count
from spmd_rl.models.megatron.names import OUTPUT_LAYER, hf_to_mcore, select_ep_experts, select_pp_stage, shard_for_tp
from spmd_rl.trainer.memory_plan import GIB, check_plan

torch.set_num_threads(1)

LLAMA = ModelArgs(architecture="LlamaForCausalLM", model_type="llama", vocab_size=96, hidden_size=32,
                  intermediate_size=64, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=8)
QWEN2_TIED = LLAMA.replace(architecture="Qwen2ForCausalLM", model_type="qwen2", vocab_size=97,
                           tie_word_embeddings=True, attention_bias=True)  # tp=2 pads 97 -> 98
QWEN3 = LLAMA.replace(architecture="Qwen3ForCausalLM", model_type="qwen3", qk_norm=True)
QWEN05 = ModelArgs(architecture="Qwen2ForCausalLM", model_type="qwen2", vocab_size=151936, hidden_size=896,
                   intermediate_size=4864, num_layers=24, num_heads=14, num_kv_heads=2, head_dim=64,
                   tie_word_embeddings=True, attention_bias=True)


def config(*overrides: str) -> Config:
    return load_config(Config, None, ["model.path=m", "data.train_files=[t.parquet]", "actor.strategy=megatron",
                                      *overrides])


def dims(tp=1, pp=1, dp=1) -> ParallelDims:
    return ParallelDims(1, dp, 1, tp, pp, dp * tp * pp)


def converted_stage_numel(args: ModelArgs, tp: int, pp: int, stage: int, tp_rank: int, *, lm_head: bool,
                          ep: int = 1) -> int:
    hf_state = build_model(None, args=args, seed=0).state_dict()
    full = hf_to_mcore(hf_state, args, fused_norms=False, vocab_size=padded_vocab_size(args.vocab_size, tp))
    shards = select_pp_stage(full, args, stage, pp)
    if args.is_moe:
        shards = select_ep_experts(shards, ep - 1, ep, args.num_experts)
    return sum(shard_for_tp(name, t, tp_rank, tp, num_query_groups=args.num_kv_heads).numel()
               for name, t in shards.items() if lm_head or name != OUTPUT_LAYER)


@pytest.mark.parametrize("args", [LLAMA, QWEN2_TIED, QWEN3], ids=["llama", "qwen2_tied", "qwen3"])
@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2), (2, 2), (1, 4)])
def test_stage_param_count_equals_the_converted_shards(args, tp, pp):
    for stage in range(pp):
        for lm_head in (True, False):
            want = converted_stage_numel(args, tp, pp, stage, tp_rank=tp - 1, lm_head=lm_head)
            assert stage_param_count(args, tp, pp, stage, lm_head=lm_head) == want, (stage, lm_head)


# sparse layers 0, 2, 3 (layer 1 dense): stages differ in how many experts they hold
QWEN3_MOE = QWEN3.replace(architecture="Qwen3MoeForCausalLM", model_type="qwen3_moe", num_experts=4,
                          num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=False, moe_layers=(0, 2, 3))


@pytest.mark.parametrize("pp,ep", [(1, 1), (1, 2), (2, 4), (4, 2)])
def test_moe_stage_param_count_equals_the_converted_shards(pp, ep):
    for stage in range(pp):
        for lm_head in (True, False):
            want = converted_stage_numel(QWEN3_MOE, 1, pp, stage, tp_rank=0, lm_head=lm_head, ep=ep)
            assert stage_param_count(QWEN3_MOE, 1, pp, stage, lm_head=lm_head, ep=ep) == want, (stage, lm_head)


def test_moe_plan_counts_the_experts_per_ep_rank_and_names_ep():
    # 64 experts of 3 x 1024 x 1024 per sparse layer: 0.6 GiB of fp32 parameters per layer
    args = QWEN3_MOE.replace(hidden_size=1024, moe_intermediate_size=1024, num_experts=64, vocab_size=1000)
    cfg = config("trainer.memory_limit_gb=8", "actor.megatron.use_distributed_optimizer=false",
                 "data.max_prompt_length=64", "data.max_response_length=64", "rollout.max_num_seqs=8")
    whole = ParallelDims(1, 4, 1, 1, 1, 4)
    split = ParallelDims(1, 4, 1, 1, 1, 4, ep=4)
    _, plan = plan_megatron_memory(cfg, args, whole, 8 * GIB, device_type="cuda", device_source="limit")
    _, plan_ep = plan_megatron_memory(cfg, args, split, 8 * GIB, device_type="cuda", device_source="limit")
    experts = 3 * 64 * 3 * 1024 * 1024  # three sparse layers
    assert plan.item("parameters").bytes - plan_ep.item("parameters").bytes == 4 * (experts - experts // 4)
    with pytest.raises(UserError) as err:
        check_plan(plan)
    assert str(err.value).endswith("raise parallel.pp or parallel.ep (a rank holds 1/pp of the fp32 model "
                                   "and 1/ep of its experts)")
    check_plan(plan_ep)
    # the distributed optimizer: the dense moments over dp=4, the experts' over the 2 ranks holding them
    sharded = config("trainer.memory_limit_gb=8", "data.max_prompt_length=64", "data.max_response_length=64",
                     "rollout.max_num_seqs=8")
    ep2 = ParallelDims(1, 4, 1, 1, 1, 4, ep=2)
    _, plan = plan_megatron_memory(sharded, args, ep2, 8 * GIB, device_type="cuda", device_source="limit")
    dense = plan.item("parameters").bytes // 4 - experts // 2
    assert plan.item("optimizer state").bytes == 8 * (-(-dense // 4) + -(-(experts // 2) // 2))


def test_1f1b_stages_hold_pp_minus_rank_micro_batches():
    # 8 prompts x 4 samples per mini-batch over dp=1: 32 rows, micro-batches of 4 -> 8 per mini-batch
    cfg = config("data.train_batch_size=8", "actor.ppo_mini_batch_size=8", "rollout.n=4",
                 "actor.micro_batch_size_per_device=4", "data.max_prompt_length=64", "data.max_response_length=64")
    plans = [plan_megatron_stage(cfg, LLAMA, dims(pp=4), stage, None, device_type="cuda") for stage in range(4)]
    acts = [p.item("activations").bytes for p in plans]
    assert acts == [acts[3] * (4 - s) for s in range(4)]  # stage r: pp - r micro-batches of num_layers / pp layers
    assert [p.item("logits").bytes > 0 for p in plans] == [False, False, False, True]
    assert plans[0].item("activations").note == "4 micro-batches of 1 layer"
    # fewer micro-batches than stages: every stage holds all of them
    few = config("data.train_batch_size=4", "actor.ppo_mini_batch_size=4", "rollout.n=2",
                 "actor.micro_batch_size_per_device=4")
    assert plan_megatron_stage(few, LLAMA, dims(pp=4), 0, None).item("activations").note.startswith("2 micro")


def test_megatron_plan_sizes_qwen_0_5b():
    cfg = config("critic.enable=true", "algorithm.adv_estimator=gae", "actor.use_kl_loss=true")
    stage, plan = plan_megatron_memory(cfg, QWEN05, dims(tp=2, pp=2), None, device_type="cuda")
    # Stage 0: 12 blocks over tp=2 + half the padded embedding; a tied embedding split over
    # stages puts the same-sized copy on the last stage, with the final norm.
    blocks = (QWEN05.num_layers // 2) * ((14_912_384 - 2 * 896) // 2 + 2 * 896)
    first = blocks + 151936 // 2 * 896
    assert stage_param_count(QWEN05, 2, 2, 0) == first
    assert stage_param_count(QWEN05, 2, 2, 1) == first + 896
    assert plan.item("parameters").bytes == 4 * stage_param_count(QWEN05, 2, 2, stage)
    assert plan.item("optimizer state").bytes == 2 * plan.item("gradients").bytes
    # The first stage's engine: all layers in bf16, tensor-parallel over tp=2; the other stages have none.
    first, last = (plan_megatron_stage(cfg, QWEN05, dims(tp=2, pp=2), s, None, device_type="cuda") for s in (0, 1))
    assert first.item("rollout weights").bytes == 494_032_768 and first.item("KV cache").bytes > 0
    assert last.item("rollout weights").bytes == 0 and last.item("KV cache").bytes == 0
    critic = plan.item("critic parameters").bytes // 4
    assert critic == stage_param_count(QWEN05, 2, 2, stage, lm_head=False) + (897 if stage == 1 else 0)
    assert plan.item("reference parameters").bytes == plan.item("parameters").bytes


def test_megatron_plan_refuses_what_cannot_fit_in_one_line():
    cfg = config("trainer.memory_limit_gb=4", "actor.micro_batch_size_per_device=1", "data.max_prompt_length=128",
                 "data.max_response_length=128", "rollout.max_num_seqs=8")
    _, plan = plan_megatron_memory(cfg, QWEN05, dims(), 4 * GIB, device_type="cuda",
                                   device_source="trainer.memory_limit_gb=4")
    with pytest.raises(UserError) as err:
        check_plan(plan)
    # 494M fp32 parameters: 1.84 GiB each for parameters and gradients, 3.68 GiB of AdamW state
    assert str(err.value).startswith("memory plan: training needs ")
    assert str(err.value).endswith("biggest item: optimizer state 3.68 GiB: raise parallel.pp or parallel.tp "
                                   "(a rank holds 1/(tp x pp) of the fp32 model)")
    _, split = plan_megatron_memory(cfg, QWEN05, dims(tp=2, pp=4), 4 * GIB, device_type="cuda",
                                    device_source="trainer.memory_limit_gb=4")
    check_plan(split)  # 1/8 of the model per rank fits


def test_live_micro_batches_follow_each_sections_own_sizes():
    from spmd_rl.models.megatron.memory_plan import _micro_batches_per_mini

    cfg = config("critic.enable=true", "algorithm.adv_estimator=gae", "data.train_batch_size=8",
                 "actor.ppo_mini_batch_size=8", "rollout.n=4", "actor.micro_batch_size_per_device=32",
                 "critic.micro_batch_size_per_device=4", "critic.ppo_mini_batch_size=4")
    assert _micro_batches_per_mini(cfg, cfg.actor, dims(pp=4)) == 1  # 32 rows of 32
    assert _micro_batches_per_mini(cfg, cfg.critic, dims(pp=4)) == 4  # 16 rows of 4
    assert _micro_batches_per_mini(cfg, cfg.critic, dims(pp=4, dp=2)) == 2
    budget = config("actor.max_tokens_per_micro_batch=512")
    assert _micro_batches_per_mini(budget, budget.actor, dims(pp=4)) == 4  # unknown count: pp bounds it


def test_distributed_optimizer_divides_the_adamw_state_by_dp():
    cfg = config("critic.enable=true", "algorithm.adv_estimator=gae", "data.train_batch_size=8",
                 "actor.ppo_mini_batch_size=8")
    P = stage_param_count(QWEN05, 2, 1, 0)
    sharded = plan_megatron_stage(cfg, QWEN05, dims(tp=2, dp=3), 0, None)
    assert sharded.item("optimizer state").bytes == 8 * -(-P // 3)  # this rank's ceil(P / dp) range
    assert sharded.item("gradients").bytes == 4 * P  # the gradient buffer stays whole (reduce-scattered in place)
    Pc = stage_param_count(QWEN05, 2, 1, 0, lm_head=False) + QWEN05.hidden_size + 1
    assert sharded.item("critic optimizer state").bytes == 8 * -(-Pc // 3)
    whole = plan_megatron_stage(config("actor.megatron.use_distributed_optimizer=false"), QWEN05,
                                dims(tp=2, dp=3), 0, None)
    assert whole.item("optimizer state").bytes == 8 * P
    # A plan that does not fit because of the whole AdamW state names the switch first.
    tight = config("actor.megatron.use_distributed_optimizer=false", "trainer.memory_limit_gb=2",
                   "actor.micro_batch_size_per_device=1", "data.max_prompt_length=64", "data.max_response_length=64",
                   "rollout.max_num_seqs=4", "rollout.kv_cache_gb=0.01")
    _, plan = plan_megatron_memory(tight, QWEN05, dims(dp=4), 2 * GIB, device_type="cuda",
                                   device_source="trainer.memory_limit_gb=2")
    with pytest.raises(UserError) as err:
        check_plan(plan)
    assert str(err.value).endswith("biggest item: optimizer state 3.68 GiB: set actor.megatron.use_distributed_optimizer"
                                   "=true (AdamW state over the 4 dp ranks) or raise parallel.pp or parallel.tp "
                                   "(a rank holds 1/(tp x pp) of the fp32 model)")
