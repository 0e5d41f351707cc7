"""The startup memory plan: parameter counts, the activation formula against what autograd
really saves, a hand-computed tiny plan, and the one-line errors of plans that do not fit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from spmd_rl.config import Config, ConfigError, load_config
from spmd_rl.distributed.parallel_dims import ParallelDims
from spmd_rl.errors import UserError
from spmd_rl.models.args import ModelArgs
from spmd_rl.models.decoder import AttentionInputs, DecoderLayer, Transformer
from spmd_rl.trainer.memory_plan import (
    GIB,
    activation_bytes_per_token_layer,
    check_plan,
    device_budget,
    format_plan,
    param_count,
    plan_memory,
)

torch.set_num_threads(1)

# Qwen2.5-0.5B's shape (494,032,768 parameters, embeddings tied).
QWEN05 = ModelArgs(architecture="Qwen2ForCausalLM", model_type="qwen2", vocab_size=151936, hidden_size=896,
                   intermediate_size=4864, num_layers=24, num_heads=14, num_kv_heads=2, head_dim=64,
                   tie_word_embeddings=True, attention_bias=True)
# V=10, H=4, I=8, 2 layers, 2 query heads and 1 kv head of width 2, untied, no bias.
TINY = ModelArgs(architecture="LlamaForCausalLM", model_type="llama", vocab_size=10, hidden_size=4,
                 intermediate_size=8, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=2)


def config(*overrides: str) -> Config:
    return load_config(Config, None, ["model.path=m", "data.train_files=[t.parquet]", *overrides])


def dims(dp_shard=1, tp=1, sp=1) -> ParallelDims:
    return ParallelDims(1, dp_shard, sp, tp, 1, dp_shard * tp * sp)


@pytest.mark.parametrize("changes", [{}, {"tie_word_embeddings": True}, {"attention_bias": True, "o_proj_bias": True},
                                     {"qk_norm": True}])
def test_param_count_matches_the_module(changes):
    args = TINY.replace(**changes)
    with torch.device("meta"):
        model = Transformer(args)
    assert param_count(args) == sum(p.numel() for p in model.parameters())


def test_param_count_of_qwen2_5_0_5b():
    assert param_count(QWEN05) == 494_032_768


def saved_bytes_per_token(args: ModelArgs, dtype: torch.dtype, packed: bool, T: int = 12) -> float:
    """Bytes of the distinct storages autograd saves in one DecoderLayer forward, per token."""
    layer = DecoderLayer(args, 0).to(dtype)
    x = torch.randn(1, T, args.hidden_size, dtype=dtype, requires_grad=True)
    cos, sin = Transformer(args).rope(torch.arange(T)[None], dtype)
    shared = {t.untyped_storage().data_ptr() for t in [cos, sin, *layer.parameters()]}  # not per layer
    seen = {}

    def pack(t):
        seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    cu = torch.tensor([0, 5, T], dtype=torch.int32) if packed else None
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x, cos, sin, AttentionInputs(cu_seqlens=cu))
    return sum(n for ptr, n in seen.items() if ptr not in shared) / T


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_activation_formula_equals_what_autograd_saves(dtype, packed, qk_norm):
    args = TINY.replace(hidden_size=16, intermediate_size=24, num_heads=4, num_kv_heads=2, head_dim=4,
                        qk_norm=qk_norm, attention_bias=True)
    b = torch.tensor([], dtype=dtype).element_size()
    assert activation_bytes_per_token_layer(args, b, packed=packed) == saved_bytes_per_token(args, dtype, packed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family,experts,top_k", [("qwen3_moe", 8, 2), ("qwen3_moe", 4, 1), ("mixtral", 8, 2)])
def test_activation_formula_of_a_sparse_layer_equals_what_autograd_saves(dtype, family, experts, top_k):
    args = TINY.replace(model_type=family, hidden_size=16, intermediate_size=24, num_heads=4, num_kv_heads=2,
                        head_dim=4, qk_norm=family == "qwen3_moe", num_experts=experts, num_experts_per_tok=top_k,
                        moe_intermediate_size=12, moe_layers=(0, 1))
    b = torch.tensor([], dtype=dtype).element_size()
    for tokens in (12, 48):  # whatever the routing: every token visits top_k experts
        assert activation_bytes_per_token_layer(args, b) == saved_bytes_per_token(args, dtype, True, T=tokens)


def test_tiny_plan_by_hand():
    cfg = config("data.max_prompt_length=6", "data.max_response_length=10", "actor.micro_batch_size_per_device=2",
                 "rollout.max_num_seqs=3")
    plan = plan_memory(cfg, TINY, dims(dp_shard=2), None, device_type="cpu")
    # P = 2 layers x (q 16 + k 8 + v 8 + o 16 + mlp 96 + norms 8 = 152) + embed 40 + lm-head 40 + norm 4 = 388
    # CPU: fp32 everywhere (b = 4), torch logprob; 388 / 2 ranks = 194 per rank.
    # Activations per token and layer: norms 2(16+4+16) = 72, projection inputs 32, q/k/v/out 4(8+4) = 48,
    # log-sum-exp 8, packed output 16, MLP 4*4*8 = 128: 304. A micro-batch: 2 x 16 = 32 tokens, 20 response.
    expected = {
        "parameters": 194 * 4,
        "gradients": 194 * 4,
        "optimizer state": 194 * 8,
        "gathered weights": (84 + 2 * 152) * 4,
        "activations": 32 * 2 * 304 + 32 * 36 + 20 * 16,  # layers + final norm + lm-head input
        "logits": 20 * (8 * 10 + 4),
        "rollout weights": 388 * 4,
        "KV cache": 3 * 16 * 2 * 2 * 1 * 2 * 4,
    }
    assert {i.name: i.bytes for i in plan.items} == expected
    assert plan.phase_bytes("generation") == 776 + 1552 + 1552 + 1536 == 5416
    assert plan.phase_bytes("training") == 776 + 776 + 1552 + 1552 + 20928 + 1680 + 1552 == 28816
    assert (plan.peak_phase, plan.peak_bytes) == ("training", 28816)

    # Checkpointing keeps each layer's input (H x 4 bytes per token) plus one layer being recomputed.
    ac = plan_memory(config(*_tiny(), "actor.activation_checkpointing=true"), TINY, dims(dp_shard=2), None,
                     device_type="cpu")
    assert ac.item("activations").bytes == 32 * (2 * 16 + 304) + 32 * 36 + 20 * 16 == 12224
    # Offloaded parameters and optimizer state leave the generation phase only.
    off = plan_memory(config(*_tiny(), "actor.offload.params=true", "actor.offload.optimizer=true"), TINY,
                      dims(dp_shard=2), None, device_type="cpu")
    assert off.phase_bytes("generation") == 1552 + 1536
    assert off.phase_bytes("training") == 28816
    # Dynamic batching: 40 tokens per micro-batch, 40 x 10 / 16 = 25 of them response tokens.
    dyn = plan_memory(config(*_tiny(), "actor.max_tokens_per_micro_batch=40"), TINY, dims(dp_shard=2), None,
                      device_type="cpu")
    assert dyn.item("logits").bytes == 25 * 84
    assert dyn.item("logits").knob == "set model.kernels=triton (fused logprob, CUDA) or lower actor.max_tokens_per_micro_batch"
    assert plan_memory(cfg, TINY, dims(), None, device_type="cuda").item("logits").knob == \
        "lower actor.micro_batch_size_per_device"  # the fused kernel is already in use


def _tiny():
    return ["data.max_prompt_length=6", "data.max_response_length=10", "actor.micro_batch_size_per_device=2",
            "rollout.max_num_seqs=3"]


def test_sharding_and_gpu_dtypes():
    cfg = config("data.max_prompt_length=512", "data.max_response_length=512", "actor.micro_batch_size_per_device=4",
                 "rollout.max_num_seqs=64")
    plan = plan_memory(cfg, QWEN05, dims(dp_shard=4, tp=2), None, device_type="cuda")
    P = 494_032_768
    assert plan.item("optimizer state").bytes == -(-P // 8) * 8
    assert plan.item("rollout weights").bytes == P * 2 // 2  # bf16 engine copy, tensor-parallel like the trainer (tp=2)
    # 64 seqs x 1024 slots x 24 layers x 2 (k, v) x 2 kv heads x 64 x 2 bytes = 768 MiB, half per tp rank
    assert plan.item("KV cache").bytes == 768 * 1024**2 // 2
    # Fused Triton logprob on CUDA: one bf16 chunk of 4 x 512 tokens x 75968 vocab rows (< 2^28)
    assert plan.item("logits").bytes == 4 * 512 * 75968 * 2


def test_format_plan_table():
    cfg = config("data.max_prompt_length=512", "data.max_response_length=512", "rollout.max_num_seqs=64")
    text = format_plan(plan_memory(cfg, QWEN05, dims(dp_shard=8), 80 * GIB, device_type="cuda",
                                   device_source="trainer.memory_limit_gb=80"))
    assert text == """\
memory plan per rank (GiB)
                        size  generation  training
  parameters           0.230       0.230     0.230
  gradients            0.230           -     0.230
  optimizer state      0.460       0.460     0.460
  gathered weights     0.309           -     0.309
  activations         10.888           -    10.888
  logits               0.500           -     0.500
  rollout weights      0.920       0.920     0.920
  KV cache             0.750       0.750         -
  total                            2.360    13.537
  peak: training 13.537 GiB; budget: 80.000 GiB (trainer.memory_limit_gb=80)"""


def _check(cfg, args, d, limit_gb, device_type="cuda"):
    check_plan(plan_memory(cfg, args, d, int(limit_gb * GIB), device_type=device_type,
                           device_source=f"trainer.memory_limit_gb={limit_gb:g}"))


def test_impossible_configs_name_the_biggest_item_and_its_knob():
    long = ["data.max_prompt_length=512", "data.max_response_length=1024"]
    with pytest.raises(UserError, match=r"^memory plan: training needs 18\.98 GiB per rank > 8\.00 GiB "
                       r"\(trainer\.memory_limit_gb=8\); biggest item: activations 16\.34 GiB per micro-batch: lower "
                       r"actor\.micro_batch_size_per_device or set actor\.activation_checkpointing=true \(sized for "
                       r"full-length sequences; trainer\.memory_limit_gb sets the budget\)$"):
        _check(config(*long), QWEN05, dims(dp_shard=8), 8)
    with pytest.raises(UserError, match=r"biggest item: activations .* per micro-batch: lower "
                       r"actor\.max_tokens_per_micro_batch \(sized"):
        _check(config(*long, "actor.max_tokens_per_micro_batch=65536", "actor.activation_checkpointing=true"),
               QWEN05, dims(dp_shard=8), 8)
    # 2048 seqs x 1536 slots x 24 layers x 2 x 2 kv heads x 64 x 2 bytes = 36 GiB, but the engine takes at
    # most gpu_memory_utilization of the device: 0.5 x 30 GiB fits, 0.99 x 30 = 29.70 GiB does not.
    _check(config(*long, "rollout.max_num_seqs=2048"), QWEN05, dims(dp_shard=8), 30)
    with pytest.raises(UserError, match=r"^memory plan: generation needs 31\.31 GiB per rank > 30\.00 GiB .* "
                       r"biggest item: KV cache 29\.70 GiB: lower rollout\.kv_cache_gb / "
                       r"rollout\.gpu_memory_utilization"):
        _check(config(*long, "rollout.max_num_seqs=2048", "rollout.gpu_memory_utilization=0.99"), QWEN05,
               dims(dp_shard=8), 30)
    # A 7B-like model on one rank: the optimizer state dominates generation -> offload it.
    big = QWEN05.replace(hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28, num_kv_heads=4,
                         head_dim=128, tie_word_embeddings=False)
    short = ["data.max_prompt_length=256", "data.max_response_length=256", "actor.micro_batch_size_per_device=1"]
    with pytest.raises(UserError, match=r"^memory plan: generation needs .* biggest item: optimizer state 56\.\d\d GiB: "
                       r"set actor\.offload\.optimizer=true or raise parallel\.dp_shard$"):
        _check(config(*short, "rollout.max_num_seqs=1536"), big, dims(), 80)  # KV cache 42 GiB
    # ... but when the update is the peak, offloading cannot help: shard more.
    with pytest.raises(UserError, match=r"^memory plan: training needs .* biggest item: optimizer state 56\.\d\d GiB: "
                       r"raise parallel\.dp_shard \(or parallel\.tp\): the update needs the optimizer state on the device$"):
        _check(config(*short, "rollout.max_num_seqs=8"), big, dims(), 80)
    _check(config(*short, "rollout.max_num_seqs=8"), big, dims(dp_shard=8), 80)  # fits: no error


def test_budget_is_unchecked_on_cpu_unless_a_limit_is_set():
    assert device_budget(config(), torch.device("cpu")) == (None, "unchecked on CPU: set trainer.memory_limit_gb")
    assert device_budget(config("trainer.memory_limit_gb=1.5"), torch.device("cpu")) == (
        int(1.5 * GIB), "trainer.memory_limit_gb=1.5")
    with pytest.raises(ConfigError, match=r"trainer\.memory_limit_gb: must be >= 0 GiB"):
        config("trainer.memory_limit_gb=-1")


def test_cpu_kv_cache_is_capped_by_the_engine_pool_budget():
    """On CPU the engine's pool never exceeds rollout.kv_cache_gb, so neither does the plan's item."""
    cfg = config("data.max_prompt_length=512", "data.max_response_length=512", "rollout.max_num_seqs=64",
                 "rollout.kv_cache_gb=0.25")
    plan = plan_memory(cfg, QWEN05, dims(), None, device_type="cpu")
    assert plan.item("KV cache").bytes == GIB // 4  # the full-length bound (1.5 GiB in fp32) is larger


def test_the_readme_qwen3_30b_a3b_command_fits_an_80_gib_gpu():
    # README's MoE command on 8 x 80 GiB (tp=4, dp_shard=2, both offloads, the gsm8k config):
    # the plan the trainer prints at start. Without activation checkpointing and the smaller
    # micro-batch its activations alone (174 GiB) would not fit.
    qwen3_30b_a3b = ModelArgs.from_hf_config({
        "model_type": "qwen3_moe", "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144,
        "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
        "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768, "norm_topk_prob": True,
        "tie_word_embeddings": False})
    readme = ["parallel.tp=4", "actor.offload.params=true", "actor.offload.optimizer=true"]
    fits = ["actor.activation_checkpointing=true", "actor.micro_batch_size_per_device=4"]

    def peak(*extra):
        cfg = load_config(Config, str(Path(__file__).resolve().parents[2] / "configs/grpo_gsm8k_qwen2.5_0.5b.yaml"),
                          ["model.path=m", *readme, *extra])
        return plan_memory(cfg, qwen3_30b_a3b, ParallelDims(1, 2, 1, 4, 1, 8), 80 * GIB).peak_bytes / GIB

    assert peak(*fits) < 76  # 74.4 GiB, with room for the allocator
    assert peak() > 200  # 246 GiB
