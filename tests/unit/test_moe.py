"""Mixture-of-experts decoders (Mixtral, Qwen3-MoE; ``spmd_rl/models/moe.py``).

The native decoder gives transformers' logits for both families (routing made uneven with a
random router), reads and writes their checkpoints and configs, gives every expert a gradient
(zeros for an idle one), counts parameters and FLOPs with the experts a token visits, and runs
in the native engine (greedy output = full recompute; logprobs = the trainer's). What is not
wired is refused in one line: a tp that does not divide the experts; megatron with tp > 1 or an
ep that does not divide them (the megatron backend itself: tests/distributed/test_megatron_actor.py)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from spmd_rl.errors import UserError
from spmd_rl.models import build_model
from spmd_rl.models.args import ModelArgs
from spmd_rl.models.hf_io import read_hf_config, save_pretrained
from spmd_rl.models.moe import SparseMoE, route
from spmd_rl.observability.flops import layer_matmul_flops_per_token
from spmd_rl.trainer.memory_plan import param_count

torch.set_num_threads(1)
transformers = pytest.importorskip("transformers")

VOCAB = 61
QWEN3_MOE = ModelArgs(architecture="Qwen3MoeForCausalLM", model_type="qwen3_moe", vocab_size=VOCAB, hidden_size=32,
                      intermediate_size=48, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8, qk_norm=True,
                      num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=False,
                      moe_layers=(0, 2))  # layer 1 keeps a dense MLP (mlp_only_layers=[1])
MIXTRAL = ModelArgs(architecture="MixtralForCausalLM", model_type="mixtral", vocab_size=VOCAB, hidden_size=32,
                    intermediate_size=24, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                    num_experts=3, num_experts_per_tok=2, moe_intermediate_size=24, moe_layers=(0, 1))
FAMILIES = {"qwen3_moe": QWEN3_MOE, "mixtral": MIXTRAL}


def native_with_uneven_routing(args: ModelArgs, seed: int = 0):
    """A random model whose routers are scaled up, so tokens prefer different experts."""
    model = build_model(None, args=args, seed=seed).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight")):
                param.mul_(50.0)
    return model


def test_route_picks_the_top_k_and_renormalises_when_asked():
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0]])
    probs = torch.softmax(logits, -1)
    weights, experts = route(logits, 2, normalize=False)
    assert experts.tolist() == [[1, 2]]
    torch.testing.assert_close(weights, probs[:, [1, 2]])
    weights, _ = route(logits, 2, normalize=True)
    torch.testing.assert_close(weights, probs[:, [1, 2]] / probs[:, [1, 2]].sum())


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_equal_transformers_and_checkpoints_round_trip(tmp_path, family):
    args = FAMILIES[family]
    model = native_with_uneven_routing(args)
    save_pretrained(model, args, tmp_path)  # HF names and config.json, as the trainer exports
    config = json.loads((tmp_path / "config.json").read_text())
    assert ModelArgs.from_hf_config(read_hf_config(tmp_path)) == args
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == args.architecture
    if family == "qwen3_moe":
        assert config["mlp_only_layers"] == [1] and hf.config.norm_topk_prob is False
    ids = torch.randint(0, VOCAB, (3, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.compute_logits(model(ids, torch.arange(9).expand(3, 9)))
        theirs = hf(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    # the routing is not degenerate: the layer-0 tokens spread over every expert
    moe = model.model.layers[0].get_submodule(model.model.layers[0].ffn_name)
    hidden = model.model.layers[0].post_attention_layernorm(model.model.embed_tokens(ids))
    _, chosen = route(moe.gate(hidden.reshape(-1, args.hidden_size)), args.num_experts_per_tok, True)
    assert set(chosen.flatten().tolist()) == set(range(args.num_experts))
    reloaded = build_model(str(tmp_path)).float()
    assert all(torch.equal(p, reloaded.state_dict()[k]) for k, p in model.state_dict().items())
    # bf16 (the engine's dtype on GPU): the same routing-weight dtypes as transformers (fp32 for
    # Mixtral, bf16 for Qwen3-MoE); Qwen3-MoE is bit-identical, Mixtral within one bf16 step of the
    # logits (transformers runs gate and up as one fused GEMM, whose bf16 rounding can differ)
    hf16 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    ours16 = model.to(torch.bfloat16)
    with torch.no_grad():
        diff = (ours16.compute_logits(ours16(ids, torch.arange(9).expand(3, 9))).float() - hf16(ids).logits.float())
    assert diff.abs().max().item() <= (0.0 if family == "qwen3_moe" else 4e-3)


def test_real_qwen3_moe_config_reads_as_expected():
    # Keys as Qwen3-30B-A3B's config.json spells them ("num_experts", decoder_sparse_step)
    cfg = {"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 151936,
           "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768, "num_hidden_layers": 48,
           "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128,
           "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
           "rope_theta": 1000000.0, "tie_word_embeddings": False}
    args = ModelArgs.from_hf_config(cfg)
    assert (args.num_experts, args.num_experts_per_tok, args.moe_intermediate_size) == (128, 8, 768)
    assert args.moe_layers == tuple(range(48)) and args.norm_topk_prob and args.qk_norm
    # 30.5B parameters, 3.3B of them active per token (Qwen3 technical report: 30B-A3B)
    assert round(param_count(args) / 1e9, 1) == 30.5
    active = args.replace(num_experts=8)  # what one token goes through
    assert round(param_count(active) / 1e9, 1) == 3.3
    assert layer_matmul_flops_per_token(args, 0) == layer_matmul_flops_per_token(active, 0) + 2 * 2048 * 120


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_param_count_equals_the_model(family):
    args = FAMILIES[family]
    model = build_model(None, args=args, seed=0)
    assert param_count(args) == sum(p.numel() for p in model.parameters())


def test_every_expert_gets_a_gradient_even_when_idle():
    torch.manual_seed(0)
    moe = SparseMoE(8, 6, num_experts=4, top_k=1, normalize=True)
    with torch.no_grad():
        moe.gate.weight.zero_()
        moe.gate.weight[2] = 1.0  # every token prefers expert 2
    x = torch.rand(5, 8) + 0.1
    moe(x).sum().backward()
    for e, expert in enumerate(moe.experts):
        grads = [p.grad for p in expert.parameters()]
        assert all(g is not None for g in grads), e
        assert any(g.abs().sum() > 0 for g in grads) == (e == 2), e
    # top-1 with renormalisation: the output is exactly expert 2's
    torch.testing.assert_close(moe(x), moe.experts[2](x))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_native_engine_generates_and_scores_as_the_trainer(family):
    from spmd_rl.rollout import SamplingParams
    from spmd_rl.rollout.native import NativeEngine
    from spmd_rl.trainer.policy import PolicyModel, build_scoring_inputs

    model = native_with_uneven_routing(FAMILIES[family], seed=1)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (1, 4, 9, 3)]
    engine = NativeEngine(copy.deepcopy(model), max_num_seqs=3, max_num_batched_tokens=8, block_size=4)
    greedy = [group[0].token_ids for group in engine.generate(prompts, SamplingParams(temperature=0.0,
                                                                                      max_new_tokens=6))]
    for prompt, tokens in zip(prompts, greedy):  # argmax of a full forward, one token at a time
        seq = list(prompt)
        with torch.no_grad():
            for _ in range(6):
                seq.append(int(model.compute_logits(model(torch.tensor([seq]), torch.arange(len(seq))[None])[0, -1]).argmax()))
        assert tokens == seq[len(prompt):]
    sampled = [c for group in engine.generate(prompts, SamplingParams(n=2, temperature=1.0, max_new_tokens=6, seed=3))
               for c in group]
    inputs = build_scoring_inputs([p for p in prompts for _ in range(2)], [c.token_ids for c in sampled], "cpu")
    with torch.no_grad():
        ref, _ = PolicyModel(copy.deepcopy(model))(inputs)
    got = torch.tensor([lp for c in sampled for lp in c.logprobs])
    assert (got - ref).abs().max().item() < 1e-5


def test_what_does_not_fit_is_refused_in_one_line():
    from spmd_rl.distributed.tensor_parallel import check_tp_divisible
    from spmd_rl.models.megatron.config import check_megatron_compatible

    check_tp_divisible(QWEN3_MOE, 2)  # experts split over tp like the dense MLP (test_model_parallel.py)
    with pytest.raises(UserError) as err:
        check_tp_divisible(QWEN3_MOE.replace(moe_intermediate_size=17), 2)
    assert str(err.value) == ("parallel.tp=2 must divide the model's expert intermediate size 17: "
                              "choose a tp that divides them")
    # megatron: experts split over ep ranks, not over tp (megatron-core wants sequence parallelism then)
    check_megatron_compatible(MIXTRAL, tp=1, pp=2, ep=3)
    cases = {
        (2, 1): "mixtral is a mixture-of-experts model: megatron-core needs sequence parallelism for MoE under tensor "
                "parallelism, which this backend does not use; set parallel.tp=1 and split the experts with "
                "parallel.ep, or use actor.strategy=fsdp",
        (1, 2): "num_experts=3 is not divisible by expert parallel size 2; choose parallel.ep among the divisors of 3",
    }
    for (tp, ep), message in cases.items():
        with pytest.raises(ValueError) as err:
            check_megatron_compatible(MIXTRAL, tp=tp, ep=ep)
        assert str(err.value) == message
    with pytest.raises(ValueError, match=r"^parallel.ep=2 splits experts, but qwen3 has none: set parallel.ep=1$"):
        check_megatron_compatible(QWEN3_MOE.replace(model_type="qwen3", num_experts=0, num_experts_per_tok=0,
                                                    moe_intermediate_size=0, moe_layers=()), ep=2)


def test_config_defaults_and_inconsistent_configs():
    base = {"model_type": "qwen3_moe", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4}
    qwen = ModelArgs.from_hf_config(base)  # transformers' defaults for absent keys
    assert (qwen.num_experts, qwen.num_experts_per_tok, qwen.moe_intermediate_size, qwen.norm_topk_prob,
            qwen.moe_layers) == (128, 8, 768, False, (0, 1))
    mixtral = ModelArgs.from_hf_config({**base, "model_type": "mixtral"})
    assert (mixtral.num_experts, mixtral.num_experts_per_tok, mixtral.moe_intermediate_size) == (8, 2, 16)
    assert not ModelArgs.from_hf_config({**base, "mlp_only_layers": [0, 1]}).is_moe  # every layer dense
    assert not ModelArgs.from_hf_config({**base, "num_experts": 0}).is_moe  # dense, as transformers builds it
    with pytest.raises(UserError, match=r"^num_experts_per_tok=5 must be in \[1, num_experts=4\]: fix config.json$"):
        ModelArgs.from_hf_config({**base, "num_experts": 4, "num_experts_per_tok": 5})
    with pytest.raises(UserError, match=r"^sparse layers \[2\] do not fit num_experts=4 and 2 layers"):
        QWEN3_MOE.replace(num_layers=2, moe_layers=(2,))
