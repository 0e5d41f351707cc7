"""FLOPs from the model shape: hand-computed cases, FlopCounterMode on the native decoder, peak table, MFU."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from spmd_rl.models import ModelArgs, build_model
from spmd_rl.observability import flops as F
from spmd_rl.observability.flops import (
    attention_flops,
    decoder_flops_per_token,
    forward_flops,
    inference_flops,
    layer_matmul_flops_per_token,
    lm_head_flops_per_token,
    mfu,
    peak_flops,
    peak_flops_for_name,
    training_flops,
)

torch.set_num_threads(1)


def tiny_args(**changes) -> ModelArgs:
    # H=64, I=96, 2 layers, 4 query heads and 2 kv heads of width 16, V=300.
    base = ModelArgs(architecture="Qwen2ForCausalLM", model_type="qwen2", vocab_size=300, hidden_size=64,
                     intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                     attention_bias=True)
    return base.replace(**changes)


# ---------------------------------------------------------------- hand-computed

def test_per_token_matmuls_by_hand():
    args = tiny_args()
    # q: 2*64*(4*16)=8192, o: 2*(4*16)*64=8192, k and v: 2*64*(2*16)=4096 each (GQA: half of q),
    # gate/up/down: 2*64*96=12288 each -> 8192+8192+4096+4096+3*12288 = 61440 per layer.
    assert layer_matmul_flops_per_token(args) == 61440
    # lm-head 2*64*300 = 38400, the same whether tied to the embedding or not.
    assert lm_head_flops_per_token(args) == 38400
    assert lm_head_flops_per_token(args.replace(tie_word_embeddings=True)) == 38400


def test_attention_is_causal_per_sequence_by_hand():
    args = tiny_args()
    # One (query, key) pair costs 2*4*16 (scores) + 2*4*16 (values) = 256 per layer, 512 over 2 layers.
    # L=7 causal: 1+2+...+7 = 28 pairs -> 512*28 = 14336; full square 49 pairs -> 25088.
    assert attention_flops(args, 7) == 14336
    assert attention_flops(args, 7, causal=False) == 25088
    # Sliding window 3 over L=5: queries see 1, 2, 3, 3, 3 keys = 12 pairs -> 6144.
    assert attention_flops(args.replace(sliding_window=3), 5) == 6144
    assert attention_flops(args.replace(sliding_window=8), 5) == 512 * 15  # window longer than the sequence
    # Per token at L=7: 2 layers * 61440 + 38400 = 161280 dense, + 14336 / 7 = 2048 attention.
    assert decoder_flops_per_token(args, 7) == 163328


def test_packed_batch_by_hand():
    args = tiny_args()
    lengths = [5, 1, 7]
    # 13 tokens: weights 13*2*61440 = 1597440; attention 512*(15+1+28) = 22528; lm-head 13*38400 = 499200.
    assert forward_flops(args, lengths) == 1597440 + 22528 + 499200 == 2119168
    assert inference_flops(args, lengths) == 2119168
    assert training_flops(args, lengths) == 3 * 2119168 == 6357504
    # Logits for 6 response tokens only: 1597440 + 22528 + 6*38400.
    assert forward_flops(args, lengths, lm_head_tokens=6) == 1850368
    # Packing is not one long sequence: a single 13-token sequence has 91 pairs, not 44.
    assert forward_flops(args, [13]) - forward_flops(args, lengths) == 512 * (91 - 44)


def test_dense_part_is_two_flops_per_weight():
    # Kaplan et al.'s 2N per token: every matmul weight (embedding lookup aside, lm-head included) once.
    args = tiny_args(model_type="qwen3", architecture="Qwen3ForCausalLM", qk_norm=True, attention_bias=False,
                     num_kv_heads=1, head_dim=32)
    model = build_model(None, args=args, seed=0)
    matmul_weights = sum(p.numel() for n, p in model.named_parameters() if p.ndim == 2 and "embed_tokens" not in n)
    per_token_at_1 = decoder_flops_per_token(args, 1) - attention_flops(args, 1)
    assert per_token_at_1 == 2 * matmul_weights


@pytest.mark.parametrize("bad", [
    lambda a: decoder_flops_per_token(a, 0),
    lambda a: attention_flops(a, -1),
    lambda a: forward_flops(a, [3, -1]),
    lambda a: forward_flops(a, [3, 4], lm_head_tokens=8),
])
def test_bad_lengths_raise(bad):
    with pytest.raises(ValueError, match="must be"):
        bad(tiny_args())


# ---------------------------------------------------------------- against torch's FLOP counter

def counted(model, lengths: list[int], backward: bool = False) -> dict[str, int]:
    """FlopCounterMode's per-op FLOPs of a packed forward (+ backward) with logits for every token."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.args.vocab_size, (1, sum(lengths)), generator=g)
    pos = torch.cat([torch.arange(L) for L in lengths])[None]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    # The math backend spells attention as bmm's the counter sees; CPU's fused SDPA kernel has no
    # FLOP formula registered and would count 0.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        logits = model.compute_logits(model(ids, pos, cu_seqlens=cu))
        if backward:
            logits.float().square().mean().backward()
    return {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}


@pytest.mark.parametrize("changes", [{}, {"model_type": "qwen3", "architecture": "Qwen3ForCausalLM", "qk_norm": True,
                                          "attention_bias": False, "num_kv_heads": 1, "tie_word_embeddings": True}])
def test_forward_matches_flop_counter(changes):
    args = tiny_args(**changes)
    model = build_model(None, args=args, seed=0)
    lengths = [5, 1, 7]
    ops = counted(model, lengths)
    causal = sum(attention_flops(args, L) for L in lengths)
    square = sum(attention_flops(args, L, causal=False) for L in lengths)
    # Weight matmuls (mm, and addmm for the biased q/k/v): exact, tolerance 0. Bias adds are
    # not counted by either side.
    assert ops.get("aten.mm", 0) + ops.get("aten.addmm", 0) == forward_flops(args, lengths) - causal
    # Attention: the math path multiplies the full L x L score matrix and masks afterwards, so
    # the counter sees L^2 pairs per sequence; we count the L(L+1)/2 a causal kernel computes.
    assert ops["aten.bmm"] == square == 512 * (25 + 1 + 49)
    assert causal == 512 * (15 + 1 + 28)


def test_forward_backward_matches_three_forwards():
    args = tiny_args()
    model = build_model(None, args=args, seed=0)
    lengths = [4, 6]
    ops = counted(model, lengths, backward=True)
    causal = sum(attention_flops(args, L) for L in lengths)
    square = sum(attention_flops(args, L, causal=False) for L in lengths)
    # Backward = 2 matmuls per forward matmul (input and weight gradients); embedding backward is a scatter.
    assert sum(ops.values()) == training_flops(args, lengths) - 3 * causal + 3 * square


# ---------------------------------------------------------------- peak FLOP/s and MFU

@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989.4),
    ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H100 NVL", 835.5),
    ("NVIDIA H200", 989.4),
    ("NVIDIA H200 NVL", 835.5),
    ("NVIDIA GH200 480GB", 989.4),
    ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100 80GB PCIe", 312.0),
    ("NVIDIA L40S", 362.05),
    ("NVIDIA L40", 181.05),
    ("NVIDIA A10G", 125.0),
    ("NVIDIA A10", 125.0),
    ("NVIDIA L4", 121.0),
    ("NVIDIA GeForce RTX 4090", 165.2),
    ("NVIDIA GeForce RTX 3090", 71.0),
    ("Tesla V100-SXM2-16GB", None),
    ("NVIDIA GeForce GTX 1080", None),
])
def test_peak_table_lookup_by_name(name, tflops):
    peak = peak_flops_for_name(name)
    assert peak == (None if tflops is None else pytest.approx(tflops * 1e12))


def test_peak_of_a_cuda_device_reads_its_name(monkeypatch):
    monkeypatch.delenv(F.PEAK_TFLOPS_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert peak_flops("cuda:0") == pytest.approx(989.4e12)
    # 8 GPUs doing 2 * 989.4e12 * 8 FLOPs in 4 s: half the peak.
    assert mfu(2 * 989.4e12 * 8, 4.0, torch.device("cuda", 0), world_size=8) == pytest.approx(0.5)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    assert peak_flops("cuda") is None


def test_none_on_cpu(monkeypatch):
    monkeypatch.delenv(F.PEAK_TFLOPS_ENV, raising=False)
    assert peak_flops("cpu") is None
    assert peak_flops(None) is None
    assert mfu(1e12, 1.0, "cpu", world_size=2) is None


def test_env_override(monkeypatch):
    monkeypatch.setenv(F.PEAK_TFLOPS_ENV, "100")
    assert peak_flops("cpu") == 1e14
    # 4 devices at 100 TFLOP/s for 2 s = 8e14 possible; 2e14 done -> 0.25.
    assert mfu(2e14, 2.0, "cpu", world_size=4) == pytest.approx(0.25)
    assert mfu(2e14, 0.0, "cpu") is None
    for bad in ("abc", "0", "-5"):
        monkeypatch.setenv(F.PEAK_TFLOPS_ENV, bad)
        with pytest.raises(ValueError, match=f"SPMD_RL_PEAK_TFLOPS='{bad}' must be a positive number"):
            peak_flops("cpu")


def test_mfu_rejects_bad_world_size():
    with pytest.raises(ValueError, match="world_size must be >= 1, got 0"):
        mfu(1.0, 1.0, "cpu", world_size=0)


def test_step_flops_and_mfu_metrics(process_group, monkeypatch):
    """The logged MFU of each phase is its model FLOPs over (its time x world x peak), with the
    actor's update also as perf/mfu/actor."""
    from types import SimpleNamespace

    from spmd_rl.trainer.perf_metrics import mfu_metrics, step_flops

    args = ModelArgs(architecture="LlamaForCausalLM", model_type="llama", vocab_size=64, hidden_size=32,
                     intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
    batch = SimpleNamespace(prompt_ids=[[1, 2, 3], [4, 5]], response_ids=[[6, 7], [8, 9, 10, 11]])
    c = SimpleNamespace(policy_args=lambda: args, critic_args=lambda: None, ref=None, critic=None, dp_group=None)
    cfg = SimpleNamespace(actor=SimpleNamespace(ppo_epochs=2))
    flops = step_flops(cfg, c, batch, actor_updated=True)
    forward = F.inference_flops(args, [5, 6], lm_head_tokens=6)
    update = cfg.actor.ppo_epochs * F.training_flops(args, [5, 6], lm_head_tokens=6)
    assert flops == {"_flops/gen": forward, "_flops/old_log_prob": forward, "_flops/update_actor": update}
    monkeypatch.setenv(F.PEAK_TFLOPS_ENV, "1e-6")  # 1 MFLOP/s
    metrics = {**flops, "timing_s/gen": 2.0, "timing_s/old_log_prob": 1.0, "timing_s/update_actor": 4.0}
    out = mfu_metrics(metrics, torch.device("cpu"))
    assert not any(k.startswith("_flops/") for k in metrics)  # popped
    assert out["perf/mfu/gen"] == pytest.approx(forward / 2.0 / 1e6)
    assert out["perf/mfu/actor"] == out["perf/mfu/update_actor"] == pytest.approx(update / 4.0 / 1e6)
    assert "perf/mfu/step" not in out  # no timing_s/step in this dict: no step MFU
