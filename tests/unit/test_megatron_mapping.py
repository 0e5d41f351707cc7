"""megatron-core backend mapping: ModelArgs -> TransformerConfig/GPTModel kwargs, HF <-> GPTModel
state dicts (grouped fused q/k/v, gate/up), tensor/pipeline sharding, and the lazy availability
check. Everything but the last test runs without megatron-core."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

torch.set_num_threads(1)

from spmd_rl.config import ActorConfig  # noqa: E402
from spmd_rl.config_loader import ConfigError  # noqa: E402
from spmd_rl.errors import UserError  # noqa: E402
from spmd_rl.models.args import ModelArgs  # noqa: E402
from spmd_rl.models.decoder import Transformer  # noqa: E402
from spmd_rl.models.megatron import (  # noqa: E402
    gather_tp_shards,
    gpt_model_kwargs,
    hf_to_mcore,
    iter_hf_weights_from_mcore_shards,
    layers_for_pp_stage,
    mcore_to_hf,
    padded_vocab_size,
    select_pp_stage,
    shard_for_tp,
    transformer_config_kwargs,
)
from spmd_rl.models.megatron import backend  # noqa: E402
from spmd_rl.models.megatron.names import fuse_qkv, split_qkv, stage_name_to_global, tp_layout  # noqa: E402
from tests.distributed.launcher import run_on_ranks  # noqa: E402

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
QWEN_CONFIG = SHARED / "assets" / "qwen2.5-tokenizer" / "config.json"


def qwen2_args(**changes) -> ModelArgs:
    """Tiny Qwen2-like decoder: GQA with 4 query heads in 2 groups, q/k/v bias, tied embeddings."""
    args = ModelArgs(architecture="Qwen2ForCausalLM", model_type="qwen2", vocab_size=30, hidden_size=16,
                     intermediate_size=24, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=4,
                     attention_bias=True, tie_word_embeddings=True, rope_theta=1e6)
    return args.replace(**changes)


def qwen3_args() -> ModelArgs:
    """Tiny Qwen3-like decoder: q/k RMSNorm, no bias, untied output layer."""
    return ModelArgs(architecture="Qwen3ForCausalLM", model_type="qwen3", vocab_size=30, hidden_size=16,
                     intermediate_size=24, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                     qk_norm=True, tie_word_embeddings=False)


def random_state(args: ModelArgs, seed: int = 0) -> dict[str, torch.Tensor]:
    """An HF state dict of ``args`` with every tensor random (norms and biases too, so a misplaced
    norm or bias cannot hide behind ones/zeros)."""
    model = Transformer(args)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return {k: v.clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------ state dicts


@pytest.mark.parametrize("fused_norms", [True, False])
def test_round_trip_qwen2_gqa_bias_tied_is_bit_exact(fused_norms):
    args = qwen2_args()
    hf = random_state(args)
    mcore = hf_to_mcore(hf, args, fused_norms=fused_norms)
    assert "output_layer.weight" not in mcore  # tied: GPTModel reuses the embedding
    assert mcore["decoder.layers.1.self_attention.linear_qkv.weight"].shape == ((4 + 2 * 2) * 4, 16)
    assert mcore["decoder.layers.1.self_attention.linear_qkv.bias"].shape == ((4 + 2 * 2) * 4,)
    assert mcore["decoder.layers.0.mlp.linear_fc1.weight"].shape == (2 * 24, 16)
    norm = ("decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" if fused_norms
            else "decoder.layers.0.input_layernorm.weight")
    assert torch.equal(mcore[norm], hf["model.layers.0.input_layernorm.weight"])
    back = mcore_to_hf(mcore, args, fused_norms=fused_norms)
    assert set(back) == set(hf) - {"lm_head.weight"}
    for name, tensor in back.items():
        assert torch.equal(tensor, hf[name]), name


def test_round_trip_qwen3_qk_norm_untied_with_vocab_padding():
    args = qwen3_args()
    hf = random_state(args, seed=1)
    mcore = hf_to_mcore(hf, args, vocab_size=32)
    assert mcore["embedding.word_embeddings.weight"].shape == (32, 16)
    assert torch.equal(mcore["output_layer.weight"][30:], torch.zeros(2, 16))  # padded rows are zero
    assert torch.equal(mcore["decoder.layers.0.self_attention.q_layernorm.weight"],
                       hf["model.layers.0.self_attn.q_norm.weight"])
    assert "decoder.layers.0.self_attention.linear_qkv.bias" not in mcore
    back = mcore_to_hf(mcore, args)
    assert set(back) == set(hf)
    for name, tensor in back.items():
        assert torch.equal(tensor, hf[name]), name


def test_mcore_names_and_order():
    args = qwen2_args(num_layers=1, tie_word_embeddings=False)
    names = list(hf_to_mcore(random_state(args), args))
    assert names == [
        "embedding.word_embeddings.weight",
        "decoder.layers.0.mlp.linear_fc1.layer_norm_weight",
        "decoder.layers.0.mlp.linear_fc1.weight",
        "decoder.layers.0.mlp.linear_fc2.weight",
        "decoder.layers.0.self_attention.linear_proj.weight",
        "decoder.layers.0.self_attention.linear_qkv.bias",
        "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight",
        "decoder.layers.0.self_attention.linear_qkv.weight",
        "decoder.final_layernorm.weight",
        "output_layer.weight",
    ]


def test_fused_qkv_layout_two_groups_hand_built():
    # 4 query heads in 2 groups, head_dim 2: row r of q is head r // 2; values name their origin.
    q = torch.arange(8.0).unsqueeze(1)  # heads 0,1 -> group 0; heads 2,3 -> group 1
    k = torch.arange(10.0, 14.0).unsqueeze(1)  # k head 0 = rows 10,11; k head 1 = rows 12,13
    v = torch.arange(20.0, 24.0).unsqueeze(1)
    expected = torch.tensor([0, 1, 2, 3, 10, 11, 20, 21,   # group 0: q heads 0-1, k_0, v_0
                             4, 5, 6, 7, 12, 13, 22, 23],  # group 1: q heads 2-3, k_1, v_1
                            dtype=torch.float32).unsqueeze(1)
    fused = fuse_qkv(q, k, v, num_query_groups=2)
    assert torch.equal(fused, expected)
    assert torch.equal(fuse_qkv(q[:, 0], k[:, 0], v[:, 0], 2), expected[:, 0])  # biases: 1-D
    q2, k2, v2 = split_qkv(fused, num_heads=4, num_query_groups=2, head_dim=2)
    assert torch.equal(q2, q) and torch.equal(k2, k) and torch.equal(v2, v)


def test_unexpected_and_missing_names():
    args = qwen2_args()
    hf = random_state(args)
    with pytest.raises(ValueError) as err:
        hf_to_mcore({**hf, "model.layers.0.mlp.extra.weight": torch.zeros(1)}, args)
    assert str(err.value) == ("hf_to_mcore: unexpected parameter 'model.layers.0.mlp.extra.weight'; expected "
                              "model.embed_tokens, model.layers.N.{self_attn,mlp,block_sparse_moe,*_layernorm}.*, model.norm or lm_head")
    del hf["model.layers.1.self_attn.v_proj.weight"]
    with pytest.raises(ValueError) as err:
        hf_to_mcore(hf, args)
    assert str(err.value) == ("hf_to_mcore: layer 1 has ['k_proj', 'q_proj'] but not ['v_proj'] "
                              "for self_attention.linear_qkv.weight")
    with pytest.raises(ValueError) as err:
        mcore_to_hf({"decoder.layers.0.self_attention.core_attention.x": torch.zeros(1)}, args)
    assert str(err.value).startswith("mcore_to_hf: unexpected parameter 'decoder.layers.0.self_attention.core_attention.x'")


# ------------------------------------------------------------------------------ tensor parallel


def test_tp_shards_concatenate_back_and_qkv_shards_hold_whole_groups():
    args = qwen2_args(tie_word_embeddings=False)
    hf = random_state(args)
    mcore = hf_to_mcore(hf, args)
    for name, full in mcore.items():
        shards = [shard_for_tp(name, full, r, 2, num_query_groups=2) for r in range(2)]
        assert torch.equal(gather_tp_shards(name, shards), full), name
    # Rank r's qkv shard is exactly group r fused on its own: q heads 2r, 2r+1, then k_r, v_r.
    d = args.head_dim
    for kind in ("weight", "bias"):
        q, k, v = (hf[f"model.layers.0.self_attn.{p}.{kind}"] for p in ("q_proj", "k_proj", "v_proj"))
        for r in range(2):
            shard = shard_for_tp(f"decoder.layers.0.self_attention.linear_qkv.{kind}",
                                 mcore[f"decoder.layers.0.self_attention.linear_qkv.{kind}"], r, 2)
            group = fuse_qkv(q[2 * r * d : (2 * r + 2) * d], k[r * d : (r + 1) * d], v[r * d : (r + 1) * d], 1)
            assert torch.equal(shard, group)
    # fc1 shard r = [gate rows of r; up rows of r]; row-parallel shards split the input dim.
    gate, up = hf["model.layers.0.mlp.gate_proj.weight"], hf["model.layers.0.mlp.up_proj.weight"]
    fc1 = shard_for_tp("decoder.layers.0.mlp.linear_fc1.weight", mcore["decoder.layers.0.mlp.linear_fc1.weight"], 1, 2)
    assert torch.equal(fc1, torch.cat([gate[12:], up[12:]]))
    proj = shard_for_tp("decoder.layers.0.self_attention.linear_proj.weight",
                        mcore["decoder.layers.0.self_attention.linear_proj.weight"], 1, 2)
    assert torch.equal(proj, hf["model.layers.0.self_attn.o_proj.weight"][:, 8:])
    emb = shard_for_tp("embedding.word_embeddings.weight", mcore["embedding.word_embeddings.weight"], 1, 2)
    assert torch.equal(emb, hf["model.embed_tokens.weight"][15:])
    assert [tp_layout(n) for n in ("decoder.layers.3.mlp.linear_fc1.layer_norm_weight",
                                   "decoder.final_layernorm.weight", "output_layer.weight",
                                   "decoder.layers.0.mlp.linear_fc2.weight")] == ["replicated", "replicated",
                                                                                  "vocab", "row"]


def test_tp_shard_errors():
    with pytest.raises(ValueError) as err:
        shard_for_tp("decoder.layers.0.self_attention.linear_qkv.weight", torch.zeros(24, 4), 0, 4,
                     num_query_groups=2)
    assert str(err.value) == ("decoder.layers.0.self_attention.linear_qkv.weight: 2 query groups cannot be split "
                              "over tp=4; choose tp among the divisors of 2")
    with pytest.raises(ValueError) as err:
        shard_for_tp("embedding.word_embeddings.weight", torch.zeros(30, 4), 0, 4)
    assert str(err.value) == "embedding.word_embeddings.weight: dim 0 of size 30 is not divisible by tp=4"
    with pytest.raises(ValueError) as err:
        tp_layout("decoder.layers.0.rotary.inv_freq")
    assert str(err.value).startswith("no tensor-parallel layout for 'decoder.layers.0.rotary.inv_freq'; known suffixes:")


def test_iter_hf_weights_from_tp2_shards_streams_the_full_hf_tensors():
    args = qwen2_args()
    hf = random_state(args)
    mcore = hf_to_mcore(hf, args)
    named_shards = ((n, [shard_for_tp(n, t, r, 2) for r in range(2)]) for n, t in mcore.items())
    stream = iter_hf_weights_from_mcore_shards(named_shards, args)
    first = next(stream)  # a generator: tensors arrive one at a time, embedding first
    assert first[0] == "model.embed_tokens.weight" and torch.equal(first[1], hf["model.embed_tokens.weight"])
    rest = dict(stream)
    assert set(rest) | {first[0]} == set(hf) - {"lm_head.weight"}
    for name, tensor in rest.items():
        assert torch.equal(tensor, hf[name]), name


def _gather_over_gloo(rank: int, world_size: int, args: ModelArgs, hf: dict, out_dir: str) -> None:
    """Each rank holds its TP shard of every parameter (wrapped like megatron's DDP: ``module.``)."""
    import torch.distributed as dist

    mcore = hf_to_mcore(hf, args)
    local = [(f"module.{n}", shard_for_tp(n, t, rank, world_size)) for n, t in mcore.items()]
    got = dict(backend.iter_hf_weights_from_tp_group(local, args, tp_group=dist.group.WORLD, tp_size=world_size))
    ok = set(got) == set(hf) - {"lm_head.weight"} and all(torch.equal(t, hf[n]) for n, t in got.items())
    Path(out_dir, f"rank{rank}").write_text(json.dumps(ok))


def test_iter_hf_weights_from_tp_group_all_gathers_over_two_ranks(tmp_path):
    args = qwen2_args()
    run_on_ranks(_gather_over_gloo, 2, args, random_state(args), str(tmp_path))
    assert [json.loads((tmp_path / f"rank{r}").read_text()) for r in range(2)] == [True, True]


# ------------------------------------------------------------------------------ pipeline parallel


def test_pipeline_stages():
    assert layers_for_pp_stage(24, 1, 4) == range(6, 12)
    with pytest.raises(ValueError) as err:
        layers_for_pp_stage(24, 0, 5)
    assert str(err.value) == "num_layers=24 is not divisible by pp=5; choose pp among the divisors of 24"
    args = qwen2_args()  # 2 layers, tied
    mcore = hf_to_mcore(random_state(args), args)
    first, last = select_pp_stage(mcore, args, 0, 2), select_pp_stage(mcore, args, 1, 2)
    assert sorted(n for n in first if not n.startswith("decoder.layers.0.")) == ["embedding.word_embeddings.weight"]
    assert sorted(n for n in last if not n.startswith("decoder.layers.0.")) == [
        "decoder.final_layernorm.weight", "output_layer.weight"]
    # Layers are renumbered from 0 on each stage; the last stage holds a copy of the tied embedding.
    assert torch.equal(last["decoder.layers.0.mlp.linear_fc2.weight"], mcore["decoder.layers.1.mlp.linear_fc2.weight"])
    assert torch.equal(last["output_layer.weight"], mcore["embedding.word_embeddings.weight"])
    assert stage_name_to_global("decoder.layers.0.mlp.linear_fc2.weight", 1, 1) == "decoder.layers.1.mlp.linear_fc2.weight"
    # The copy converts to nothing: the embedding already carries the tied weight.
    assert mcore_to_hf({"output_layer.weight": last["output_layer.weight"]}, args) == {}


def _module_with(shapes: dict[str, tuple[int, ...]]) -> torch.nn.Module:
    """A module whose parameters carry exactly the given dotted names (a stand-in GPTModel stage)."""
    root = torch.nn.Module()
    for name, shape in shapes.items():
        *path, leaf = name.split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, torch.nn.Module())
            module = getattr(module, part)
        module.register_parameter(leaf, torch.nn.Parameter(torch.zeros(shape)))
    return root


def test_load_hf_into_stage_fills_this_ranks_tp_pp_slice():
    args = qwen2_args()
    hf = random_state(args)
    full = hf_to_mcore(hf, args)
    expected = {n: shard_for_tp(n, t, 1, 2) for n, t in select_pp_stage(full, args, 1, 2).items()}
    stage = _module_with({n: tuple(t.shape) for n, t in expected.items()})
    backend.load_hf_into_stage(stage, hf, args, tp_rank=1, tp_size=2, pp_rank=1, pp_size=2, fused_norms=True,
                               vocab_rows=30)
    got = stage.state_dict()
    assert set(got) == set(expected)
    assert all(torch.equal(got[n], expected[n]) for n in expected)
    assert torch.equal(got["decoder.layers.0.self_attention.linear_proj.weight"],
                       hf["model.layers.1.self_attn.o_proj.weight"][:, 8:])
    extra = _module_with({**{n: tuple(t.shape) for n, t in expected.items()}, "decoder.layers.0.mlp.router.weight": (2,)})
    with pytest.raises(ValueError) as err:
        backend.load_hf_into_stage(extra, hf, args, tp_rank=1, tp_size=2, pp_rank=1, pp_size=2, fused_norms=True,
                                   vocab_rows=30)
    assert str(err.value) == ("GPTModel stage 1 does not match the converted checkpoint: missing "
                              "['decoder.layers.0.mlp.router.weight'], unexpected []")


# ------------------------------------------------------------------------------ config kwargs


def test_config_kwargs_qwen2_5_0_5b():
    if not QWEN_CONFIG.is_file():
        pytest.skip(f"../shared/assets/qwen2.5-tokenizer/config.json not found: {QWEN_CONFIG}")
    args = ModelArgs.from_hf_config(json.loads(QWEN_CONFIG.read_text()))
    kw = transformer_config_kwargs(args, tp=2, pp=2)
    # Values read off config.json: 24 layers, 896 hidden, 14 heads over 2 KV groups, 4864 FFN,
    # head_dim 896 / 14 = 64, rms eps 1e-6, Qwen2 q/k/v bias, no qk norm.
    assert kw == dict(
        num_layers=24, hidden_size=896, num_attention_heads=14, num_query_groups=2, ffn_hidden_size=4864,
        kv_channels=64, normalization="RMSNorm", layernorm_epsilon=1e-6, layernorm_zero_centered_gamma=False,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, add_qkv_bias=True,
        qk_layernorm=False, hidden_dropout=0.0, attention_dropout=0.0, attention_softmax_in_fp32=True,
        bias_activation_fusion=False, apply_rope_fusion=False, init_method_std=0.02,
        tensor_model_parallel_size=2, pipeline_model_parallel_size=2, sequence_parallel=False,
        params_dtype=torch.bfloat16, bf16=True, fp16=False, pipeline_dtype=torch.bfloat16,
    )
    assert gpt_model_kwargs(args, tp=2) == dict(
        vocab_size=151936, max_sequence_length=32768, position_embedding_type="rope", rotary_percent=1.0,
        rotary_base=1000000, share_embeddings_and_output_weights=True, parallel_output=True,
        fp16_lm_cross_entropy=False,
    )
    # tied over two stages: the last stage keeps its own output_layer copy (synced by gradient sums)
    assert gpt_model_kwargs(args, tp=2, pp=2)["share_embeddings_and_output_weights"] is False
    # 151936 = 593.5 x 256, so padding to a multiple of 128 x tp 2 gives 594 x 256 = 152064;
    # 151936 = 148.375 x 1024, so 128 x tp 8 gives 149 x 1024 (tp 8 itself is refused below).
    assert gpt_model_kwargs(args, tp=2, make_vocab_size_divisible_by=128)["vocab_size"] == 152064
    assert padded_vocab_size(151936, tp=8, divisible_by=128) == 152576
    with pytest.raises(ValueError) as err:
        transformer_config_kwargs(args, tp=4)
    assert str(err.value) == ("num_kv_heads=2 is not divisible by tensor parallel size 4; "
                              "choose tp among the divisors of 2")


def test_config_kwargs_rope_scaling_and_refusals():
    llama = ModelArgs(architecture="LlamaForCausalLM", model_type="llama", vocab_size=30, hidden_size=16,
                      intermediate_size=24, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=4)
    scaled = llama.replace(rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    kw = gpt_model_kwargs(scaled)
    assert (kw["rope_scaling"], kw["rope_scaling_factor"], kw["rotary_base"]) == (True, 32.0, 10000)
    linear = gpt_model_kwargs(llama.replace(rope_scaling={"rope_type": "linear", "factor": 2.0}))
    assert linear["seq_len_interpolation_factor"] == 2.0 and "rope_scaling" not in linear
    assert transformer_config_kwargs(qwen3_args(), params_dtype=torch.float32)["qk_layernorm"] is True
    cases = [
        (llama.replace(attention_bias=True, o_proj_bias=True),
         "attention_bias on o_proj (Llama/Qwen3 attention_bias=true) has no megatron-core equivalent; "
         "supported: q/k/v bias only (Qwen2) or no bias"),
        (llama.replace(rope_scaling={"rope_type": "yarn", "factor": 4.0}),
         "rope_type 'yarn' is not mapped to megatron-core; supported: default, linear, llama3"),
        (scaled.replace(rope_scaling={**scaled.rope_scaling, "original_max_position_embeddings": 4096}),
         "llama3 rope scaling {'low_freq_factor': 1.0, 'high_freq_factor': 4.0, 'original_max_position_embeddings': "
         "4096.0} differs from megatron-core's fixed {'low_freq_factor': 1.0, 'high_freq_factor': 4.0, "
         "'original_max_position_embeddings': 8192}; only the factor may vary"),
        (llama.replace(sliding_window=8),
         "sliding_window=8 is not mapped to megatron-core; supported: full causal attention (Llama, Qwen2, Qwen3)"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError) as err:
            transformer_config_kwargs(args)
        assert str(err.value) == message
    assert padded_vocab_size(30, tp=4) == 32 and padded_vocab_size(32, tp=4) == 32


# ------------------------------------------------------------------------------ availability, config


def test_check_megatron_available_messages(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    with pytest.raises(UserError) as err:
        backend.check_megatron_available()
    assert str(err.value) == "actor.strategy=megatron needs megatron-core (pip install -e '.[megatron]')"
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.9.0")
    with pytest.raises(UserError) as err:
        backend.check_megatron_available()
    assert str(err.value) == ("actor.strategy=megatron supports megatron-core>=0.12,<0.17, found 0.9.0; "
                              "pip install -e '.[megatron]'")
    # CUDA is not required (CPU runs through megatron/cpu.py): a supported version that does not
    # import is the remaining failure
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.14.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    real_import = importlib.import_module

    def broken(name, *a, **k):
        if name == "megatron.core":
            raise ImportError("No module named 'apex'\nmore")
        return real_import(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", broken)
    with pytest.raises(UserError) as err:
        backend.check_megatron_available()
    assert str(err.value) == f"{backend.INSTALL_MESSAGE}; importing megatron.core failed: No module named 'apex'"
    monkeypatch.setattr(importlib, "import_module", real_import)
    if _HAVE_MEGATRON:
        backend.check_megatron_available()  # no CUDA, no error


def test_actor_strategy_config():
    from spmd_rl.config import Config, load_config

    assert ActorConfig().strategy == "fsdp"
    cfg = load_config(Config, None, ["model.path=/m", "data.train_files=[t.parquet]", "actor.strategy=megatron",
                                     "rollout.update_weights_bucket_mb=64"])
    assert cfg.actor.strategy == "megatron" and cfg.rollout.update_weights_bucket_mb == 64
    with pytest.raises(ConfigError) as err:
        load_config(Config, None, ["model.path=/m", "data.train_files=[t.parquet]", "actor.strategy=deepspeed",
                                   "rollout.update_weights_bucket_mb=0"])
    assert err.value.problems == ["actor.strategy: 'deepspeed' is not one of 'fsdp', 'megatron'",
                                  "rollout.update_weights_bucket_mb: must be > 0 (MiB per weight bucket)"]


# ------------------------------------------------------------------------------ GPU: GPTModel logits

_HAVE_MEGATRON = importlib.util.find_spec("megatron") is not None and importlib.util.find_spec("megatron.core") is not None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not _HAVE_MEGATRON,
                    reason="needs a CUDA device and megatron-core (pip install -e '.[megatron]')")
def test_gpt_model_logits_match_native_decoder():
    import torch.distributed as dist
    from megatron.core import parallel_state

    from spmd_rl.distributed.init import free_port

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("nccl", rank=0, world_size=1)
    torch.cuda.set_device(0)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        backend.init_megatron_parallel(1, 1, seed=0)
        args = qwen2_args(vocab_size=128, hidden_size=64, intermediate_size=128, head_dim=16,
                          tie_word_embeddings=False)
        native = Transformer(args)
        hf = random_state(args)
        hf = {k: v * 0.1 if k.endswith("proj.weight") or "embed" in k or "lm_head" in k else v
              for k, v in hf.items()}  # keep activations in a range where fp32 agrees to 1e-4
        native.load_state_dict(hf)
        native = native.cuda().eval()
        model, fused_norms, rows = backend.build_gpt_model(args, 1, 1, params_dtype=torch.float32)
        model = model.cuda().eval()
        backend.load_hf_into_stage(model, hf, args, tp_rank=0, tp_size=1, pp_rank=0, pp_size=1,
                                   fused_norms=fused_norms, vocab_rows=rows)
        ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0)).cuda()
        pos = torch.arange(12).expand(2, 12).cuda()
        causal = torch.triu(torch.ones(12, 12, dtype=torch.bool), 1)[None, None].cuda()  # True = masked
        with torch.no_grad():
            logits = model(input_ids=ids, position_ids=pos, attention_mask=causal)[..., : args.vocab_size]
            reference = native.compute_logits(native(ids, pos))
        assert logits.shape == reference.shape
        assert torch.allclose(logits.float(), reference, atol=1e-4, rtol=1e-4)
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


# ------------------------------------------------------------------------------ CPU execution, vocab padding


def test_real_vocab_rows_cut_the_padding_off_the_last_shard():
    from spmd_rl.models.megatron.policy import real_vocab_rows

    # 97 tokens padded to 98 over tp=2: rank 1 holds ids 49..97, the last row is padding
    assert real_vocab_rows(97, 49, 0) == (0, 49) and real_vocab_rows(97, 49, 1) == (49, 48)
    assert real_vocab_rows(96, 48, 1) == (48, 48)  # no padding: whole shard
    with pytest.raises(ValueError) as err:
        real_vocab_rows(5, 2, 3)  # 5 tokens padded to 8 over tp=4: rank 3 holds only padding
    assert str(err.value) == ("vocab_size=5 leaves TP rank 3 only padding rows (2 per rank); "
                              "use a smaller tensor parallel size")


@pytest.mark.skipif(not _HAVE_MEGATRON, reason="needs megatron-core (pip install -e '.[megatron]')")
def test_enable_cpu_execution_is_idempotent_and_cpu_only(monkeypatch):
    from megatron.core.tensor_parallel import random as mcore_random

    from spmd_rl.models.megatron.cpu import NoOpRNGTracker, causal_mask, enable_cpu_execution

    # restore what the shims replace once the test ends
    monkeypatch.setattr(torch.cuda, "current_device", torch.cuda.current_device)
    monkeypatch.setattr(mcore_random, "_CUDA_RNG_STATE_TRACKER", mcore_random._CUDA_RNG_STATE_TRACKER)
    monkeypatch.setattr(mcore_random, "_CUDA_RNG_STATE_TRACKER_INITIALIZED",
                        mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    original = torch.cuda.current_device
    assert enable_cpu_execution() is False and torch.cuda.current_device is original  # CUDA: untouched
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert enable_cpu_execution() is True
    tracker = mcore_random.get_cuda_rng_tracker()
    assert torch.cuda.current_device() == "cpu" and isinstance(tracker, NoOpRNGTracker)
    assert enable_cpu_execution() is True and mcore_random.get_cuda_rng_tracker() is tracker
    with tracker.fork():  # attention's dropout region: a no-op
        pass
    assert causal_mask(3).tolist() == [[[[False, True, True], [False, False, True], [False, False, False]]]]


def test_megatron_run_refuses_what_it_does_not_combine_with():
    from types import SimpleNamespace

    from spmd_rl.config import Config, load_config
    from spmd_rl.errors import UserError
    from spmd_rl.models.megatron.trainer_policy import check_megatron_run

    base = ["model.path=/m", "data.train_files=[t.parquet]", "actor.strategy=megatron"]
    dims = SimpleNamespace(sp=1)
    check_megatron_run(load_config(Config, None, base), dims)  # the plain setup passes
    check_megatron_run(load_config(Config, None, [*base, "critic.enable=true", "algorithm.adv_estimator=gae"]), dims)
    offload = ["critic.enable=true", "algorithm.adv_estimator=gae", "critic.offload.params=true",
               "actor.offload.optimizer=true", "actor.use_kl_loss=true", "ref.offload=true"]
    check_megatron_run(load_config(Config, None, [*base, *offload]), dims)  # host offload is supported
    cases = {
        ("rollout.engine=hf",): "rollout.engine=hf (the native engine takes megatron's weights)",
        ("model.compile=true",): "model.compile=true (it compiles the native decoder's blocks)",
        ("model.random_init=true",): "model.random_init=true (stages load the HF checkpoint)",
    }
    for overrides, what in cases.items():
        with pytest.raises(UserError) as err:
            check_megatron_run(load_config(Config, None, [*base, *overrides]), dims)
        assert str(err.value) == f"actor.strategy=megatron does not support {what}: use actor.strategy=fsdp or change it"
    with pytest.raises(UserError, match=r"parallel.sp=2 \(megatron's context parallelism is not wired\)"):
        check_megatron_run(load_config(Config, None, base), SimpleNamespace(sp=2))


def test_megatron_grid_of_checkpoint_state_names():
    from spmd_rl.models.megatron.checkpoint import megatron_grid

    assert megatron_grid(["actor/model", "actor/optim"]) is None  # an FSDP actor
    names = [f"actor/tp{t}_pp{p}/{kind}" for t in range(2) for p in range(3) for kind in ("model", "optim")]
    assert megatron_grid(names) == (2, 3, 1)
    with pytest.raises(ValueError, match=r"do not fill a 2 x 2 \(tp x pp\) grid"):
        megatron_grid(["actor/tp0_pp0/model", "actor/tp1_pp0/model", "actor/tp1_pp1/model"])
    # expert parallelism: one shard per ep rank
    names = [f"actor/tp0_pp{p}_ep{e}/model" for p in range(2) for e in range(2)]
    assert megatron_grid(names) == (1, 2, 2)
    with pytest.raises(ValueError, match=r"do not fill a 1 x 2 x 2 \(tp x pp x ep\) grid"):
        megatron_grid(names[:3])
    with pytest.raises(ValueError, match=r"do not fill"):  # ep-named and plain shards mixed
        megatron_grid(["actor/tp0_pp0_ep0/model", "actor/tp0_pp0/model"])


def test_resume_layout_must_match_the_checkpoint():
    from spmd_rl.errors import UserError
    from spmd_rl.models.megatron.checkpoint import check_resume_layout

    megatron_tp1_pp2 = [f"actor/tp0_pp{p}/{kind}" for p in range(2) for kind in ("model", "optim")]
    fsdp = ["actor/model", "actor/optim", "critic/model", "critic/optim"]
    check_resume_layout(megatron_tp1_pp2, "ck", strategy="megatron", tp=1, pp=2)
    check_resume_layout(fsdp, "ck", strategy="fsdp", tp=2, pp=1)  # FSDP reshards: any tp/dp resumes
    out = ("or export it (python -m spmd_rl.export ck OUT) and start from it (model.path=OUT trainer.resume=never; "
           "the export holds the actor's weights only)")
    cases = [
        (megatron_tp1_pp2, "megatron", 2, 1, "checkpoint ck holds a megatron actor split tp=1 x pp=2 but this run has "
         "actor.strategy=megatron parallel.tp=2 parallel.pp=1: resume with actor.strategy=megatron parallel.tp=1 "
         f"parallel.pp=2, {out}"),
        (megatron_tp1_pp2, "fsdp", 1, 1, "checkpoint ck holds a megatron actor split tp=1 x pp=2 but this run has "
         f"actor.strategy=fsdp: resume with actor.strategy=megatron parallel.tp=1 parallel.pp=2, {out}"),
        (fsdp, "megatron", 1, 2, "checkpoint ck holds an FSDP actor but this run has actor.strategy=megatron "
         f"parallel.tp=1 parallel.pp=2: resume with actor.strategy=fsdp, {out}"),
    ]
    megatron_ep2 = [f"actor/tp0_pp0_ep{e}/{kind}" for e in range(2) for kind in ("model", "optim")]
    check_resume_layout(megatron_ep2, "ck", strategy="megatron", tp=1, pp=1, ep=2)
    with pytest.raises(UserError) as err:
        check_resume_layout(megatron_ep2, "ck", strategy="megatron", tp=1, pp=1)
    assert str(err.value) == ("checkpoint ck holds a megatron actor split tp=1 x pp=1 x ep=2 but this run has "
                              "actor.strategy=megatron parallel.tp=1 parallel.pp=1 parallel.ep=1: resume with "
                              f"actor.strategy=megatron parallel.tp=1 parallel.pp=1 parallel.ep=2, {out}")
    with pytest.raises(UserError) as err:  # saved without experts split, resumed with them split
        check_resume_layout(megatron_tp1_pp2, "ck", strategy="megatron", tp=1, pp=2, ep=2)
    assert str(err.value) == ("checkpoint ck holds a megatron actor split tp=1 x pp=2 but this run has "
                              "actor.strategy=megatron parallel.tp=1 parallel.pp=2 parallel.ep=2: resume with "
                              f"actor.strategy=megatron parallel.tp=1 parallel.pp=2 parallel.ep=1, {out}")
    for names, strategy, tp, pp, message in cases:
        with pytest.raises(UserError) as err:
            check_resume_layout(names, "ck", strategy=strategy, tp=tp, pp=pp)
        assert str(err.value) == message
    with pytest.raises(UserError, match=r"^checkpoint ck: the megatron shards .* do not fill a 2 x 2 \(tp x pp\) grid; "
                       "resume from a complete checkpoint"):
        check_resume_layout(["actor/tp0_pp0/model", "actor/tp1_pp1/model"], "ck", strategy="megatron", tp=2, pp=2)


def test_a_pipeline_stage_reads_only_its_layers_of_the_checkpoint(tmp_path):
    from spmd_rl.models import build_model
    from spmd_rl.models.hf_io import load_state_dict, save_pretrained
    from spmd_rl.models.megatron.names import hf_names_for_stage

    args = ModelArgs(architecture="LlamaForCausalLM", model_type="llama", vocab_size=30, hidden_size=16,
                     intermediate_size=24, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=4)
    model = build_model(None, args=args, seed=0)
    save_pretrained(model, args, tmp_path, max_shard_bytes=8192)  # several shards: the index path
    full = load_state_dict(tmp_path)
    stage1 = load_state_dict(tmp_path, keep=hf_names_for_stage(args, 1, 2))
    layers = {int(k.split(".")[2]) for k in stage1 if k.startswith("model.layers.")}
    assert layers == {2, 3}  # the second half of the layers, nothing of the first
    assert {k for k in stage1 if not k.startswith("model.layers.")} == \
        {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}  # globals, wanted by hf_to_mcore
    for name, tensor in stage1.items():
        assert torch.equal(tensor, full[name]), name
    with pytest.raises(ValueError, match="num_layers=4 is not divisible by pp=3"):
        hf_names_for_stage(args, 0, 3)
