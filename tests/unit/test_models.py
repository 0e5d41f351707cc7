"""Native decoder vs transformers, HF folder I/O, packed/prefill/decode equivalence, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open

from spmd_rl.errors import UserError
from spmd_rl.models import (
    GenericCausalLM,
    ModelArgs,
    Transformer,
    build_model,
    load_pretrained,
    load_state_dict,
    read_hf_config,
    save_pretrained,
)
from spmd_rl.rollout.native.block_pool import KVPool

torch.set_num_threads(1)

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)

# name -> (HF config class, model class, extra config kwargs)
HF_CASES = {
    "qwen2_tied": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen2_yarn": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        dict(num_key_value_heads=2, max_position_embeddings=32, rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                                                     "original_max_position_embeddings": 8}),
    ),
    "qwen3_untied": ("Qwen3Config", "Qwen3ForCausalLM", dict(num_key_value_heads=1, head_dim=32)),
    "llama3_rope_bias": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(num_key_value_heads=2, attention_bias=True, rope_parameters={
            "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    ),
    "llama_linear_tied": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(tie_word_embeddings=True, rope_parameters={"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0}),
    ),
    "mistral_window": ("MistralConfig", "MistralForCausalLM", dict(num_key_value_heads=2, sliding_window=4)),
}


def make_hf_model(case: str, seed: int = 0):
    """A random tiny HF model whose norms and biases are perturbed too, so they all matter."""
    config_cls, model_cls, extra = HF_CASES[case]
    config = getattr(transformers, config_cls)(**TINY, **extra)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.1 if "norm" in name or name.endswith("bias") else 0.02))
    return model


def batch_inputs(B: int = 2, T: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY["vocab_size"], (B, T), generator=g), torch.arange(T).expand(B, T)


def tiny_args(**changes) -> ModelArgs:
    base = ModelArgs(architecture="Qwen2ForCausalLM", model_type="qwen2", vocab_size=300, hidden_size=64,
                     intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                     attention_bias=True)
    return base.replace(**changes)


# ---------------------------------------------------------------- parity with transformers


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_load_hf_folder_matches_transformers_logits(case, tmp_path):
    hf = make_hf_model(case)
    hf.save_pretrained(tmp_path / "hf")
    model = load_pretrained(tmp_path / "hf")
    ids, pos = batch_inputs()
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        ours = model.compute_logits(model(ids, pos))
    assert (ours - ref).abs().max().item() < 1e-4
    assert model.args.architecture == type(hf).__name__
    if model.args.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize("case", ["qwen2_tied", "qwen3_untied", "llama3_rope_bias", "mistral_window"])
def test_transformers_loads_our_save_with_identical_logits(case, tmp_path):
    hf = make_hf_model(case, seed=1)
    hf.save_pretrained(tmp_path / "hf")
    model = load_pretrained(tmp_path / "hf")
    save_pretrained(model, model.args, tmp_path / "ours")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert type(reloaded) is type(hf)
    ids, _ = batch_inputs(seed=1)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, hf(input_ids=ids).logits)
    assert ModelArgs.from_hf_config(read_hf_config(tmp_path / "ours")) == model.args


def test_args_from_real_qwen25_config():
    path = SHARED / "assets" / "qwen2.5-tokenizer"
    if not (path / "config.json").is_file():
        pytest.skip(f"../shared/assets/qwen2.5-tokenizer not found: {path}")
    args = ModelArgs.from_hf_config(read_hf_config(path))
    assert (args.model_type, args.num_layers, args.num_heads, args.num_kv_heads, args.head_dim) == ("qwen2", 24, 14, 2, 64)
    assert args.rope_theta == 1e6 and args.rope_scaling is None and args.tie_word_embeddings
    assert args.attention_bias and not args.o_proj_bias and args.eos_token_id == 151645
    assert ModelArgs.from_hf_config(args.to_hf_config()) == args


def test_legacy_and_new_rope_keys_agree():
    legacy = {**read_cfg_stub(), "rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2.0}}
    new = {**read_cfg_stub(), "rope_parameters": {"rope_type": "linear", "rope_theta": 5e5, "factor": 2.0}}
    a, b = ModelArgs.from_hf_config(legacy), ModelArgs.from_hf_config(new)
    assert a == b and a.rope_theta == 5e5 and a.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    # Qwen2.5's long-context recipe, as written in 4.x config files; the pretraining length is kept.
    yarn = {**read_cfg_stub(), "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}}
    assert ModelArgs.from_hf_config(yarn).rope_scaling == {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    # Direct construction accepts the same legacy spelling.
    assert tiny_args(rope_scaling={"type": "linear", "factor": 3.0}).rope_scaling == {"rope_type": "linear", "factor": 3.0}


def read_cfg_stub() -> dict:
    return {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2}


# ---------------------------------------------------------------- safetensors I/O


@pytest.mark.parametrize("max_shard_bytes", [2 * 1024**3, 20_000])
def test_save_load_round_trip(tmp_path, max_shard_bytes):
    args = tiny_args(tie_word_embeddings=True)
    model = build_model(None, args=args, seed=3)
    save_pretrained(model, args, tmp_path / "m", max_shard_bytes=max_shard_bytes)
    files = sorted(p.name for p in (tmp_path / "m").iterdir())
    if max_shard_bytes < 1024**3:
        index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
        shards = sorted(set(index["weight_map"].values()))
        assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
        assert files == sorted(["config.json", "model.safetensors.index.json", *shards])
    else:
        assert files == ["config.json", "model.safetensors"]
    state = load_state_dict(tmp_path / "m")
    assert "lm_head.weight" not in state  # tied copy is not written
    expected = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)
    reloaded = load_pretrained(tmp_path / "m")
    assert reloaded.args == args and reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    ids, pos = batch_inputs()
    with torch.no_grad():
        assert torch.equal(reloaded(ids, pos), model(ids, pos))


def test_save_replaces_weights_but_keeps_other_files(tmp_path):
    args = tiny_args()
    out = tmp_path / "m"
    save_pretrained(build_model(None, args=args, seed=1), args, out, max_shard_bytes=20_000)
    (out / "tokenizer.json").write_text("{}")
    model = build_model(None, args=args, seed=2)
    save_pretrained(model, args, out, dtype=torch.bfloat16)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temp folders left behind
    assert read_hf_config(out)["dtype"] == "bfloat16"
    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert torch.equal(f.get_tensor("lm_head.weight"), model.lm_head.weight.detach().bfloat16())


# ---------------------------------------------------------------- forward modes


@pytest.mark.parametrize("window", [None, 3])
def test_packed_forward_matches_per_sequence_batch_forward(window):
    args = tiny_args(model_type="mistral", architecture="MistralForCausalLM", attention_bias=False, sliding_window=window)
    model = build_model(None, args=args, seed=0)
    lengths = [5, 1, 7]
    seqs = [torch.randint(0, 300, (L,), generator=torch.Generator().manual_seed(L)) for L in lengths]
    ids = torch.cat(seqs)[None]
    pos = torch.cat([torch.arange(L) for L in lengths])[None]
    cu = torch.tensor([0, 5, 6, 13], dtype=torch.int32)
    with torch.no_grad():
        packed = model(ids, pos, cu_seqlens=cu)
        assert packed.shape == (1, 13, 64)
        for s, seq in enumerate(seqs):
            single = model(seq[None], torch.arange(len(seq))[None])[0]
            assert (packed[0, cu[s] : cu[s + 1]] - single).abs().max().item() < 1e-5


@pytest.mark.parametrize("changes", [{}, {"model_type": "qwen3", "qk_norm": True, "attention_bias": False},
                                     {"model_type": "mistral", "attention_bias": False, "sliding_window": 4}])
def test_paged_prefill_then_decode_reproduces_full_forward(changes):
    model = build_model(None, args=tiny_args(**changes), seed=5)
    full_len = [9, 6, 11]
    prompt_len = [3, 5, 1]
    # Block size 2, scattered and out-of-order blocks per sequence (pool of 20 blocks); entries
    # past a sequence's last block are never read.
    tables = torch.tensor([[7, 2, 9, 0, 11, 0], [4, 1, 8, 0, 0, 0], [19, 3, 6, 5, 13, 16]], dtype=torch.int32)
    seqs = [torch.randint(0, 300, (L,), generator=torch.Generator().manual_seed(10 + L)) for L in full_len]
    with torch.no_grad():
        want = [model.compute_logits(model(s[None], torch.arange(len(s))[None]))[0] for s in seqs]
        cache = KVPool.for_model(model.args, num_blocks=20, block_size=2, dtype=torch.float32, device="cpu")
        cu = torch.tensor([0, *torch.tensor(prompt_len).cumsum(0).tolist()], dtype=torch.int32)
        ids = torch.cat([s[:p] for s, p in zip(seqs, prompt_len)])[None]
        pos = torch.cat([torch.arange(p) for p in prompt_len])[None]
        logits = model.compute_logits(model(ids, pos, cu_seqlens=cu, kv_cache=cache, block_tables=tables))[0]
        for s, p in enumerate(prompt_len):
            assert (logits[cu[s] : cu[s + 1]] - want[s][:p]).abs().max().item() < 1e-5
        # Teacher-forced decode (mode 4): rows advance together while they have tokens left.
        for step in range(max(full_len) - min(prompt_len)):
            active = [s for s in range(3) if prompt_len[s] + step < full_len[s]]
            t = [prompt_len[s] + step for s in active]
            step_ids = torch.stack([seqs[s][i] for s, i in zip(active, t)])[:, None]
            step_logits = model.compute_logits(
                model(step_ids, torch.tensor(t)[:, None], kv_cache=cache, block_tables=tables[active])
            )[:, 0]
            for j, (s, i) in enumerate(zip(active, t)):
                assert (step_logits[j] - want[s][i]).abs().max().item() < 1e-5


@pytest.mark.parametrize("changes", [{}, {"model_type": "mistral", "attention_bias": False, "sliding_window": 3}])
def test_paged_mixed_step_with_chunked_prefill(changes):
    """One packed call holding two decode tokens, a prompt continued after a cached prefix and a
    fresh prompt gives the full forward's logits; then the fresh-prompt fast path alone."""
    model = build_model(None, args=tiny_args(**changes), seed=3)
    seqs = [torch.randint(0, 300, (L,), generator=torch.Generator().manual_seed(L)) for L in (7, 5, 12, 6)]
    with torch.no_grad():
        want = [model.compute_logits(model(s[None], torch.arange(len(s))[None]))[0] for s in seqs]
        cache = KVPool.for_model(model.args, num_blocks=16, block_size=4, dtype=torch.float32, device="cpu")
        tables = torch.tensor([[3, 9, 0], [12, 1, 0], [5, 14, 7], [2, 8, 0]], dtype=torch.int32)

        def run(parts, rows, num_decodes):  # parts: (seq index, start, end)
            ids = torch.cat([seqs[s][a:b] for s, a, b in parts])[None]
            pos = torch.cat([torch.arange(a, b) for _, a, b in parts])[None]
            cu = torch.tensor([0, *torch.tensor([b - a for _, a, b in parts]).cumsum(0).tolist()], dtype=torch.int32)
            out = model(ids, pos, cu_seqlens=cu, kv_cache=cache, block_tables=tables[rows], num_decodes=num_decodes)
            return model.compute_logits(out)[0], cu

        # Step 1 (all fresh prompts, one packed call): seqs 0, 1 up to their last token, seq 2's first chunk.
        logits, cu = run([(0, 0, 6), (1, 0, 4), (2, 0, 5)], [0, 1, 2], 0)
        for k, (s, a, b) in enumerate([(0, 0, 6), (1, 0, 4), (2, 0, 5)]):
            assert (logits[cu[k] : cu[k + 1]] - want[s][a:b]).abs().max().item() < 1e-5
        # Step 2: decodes of seqs 0 and 1, seq 2's second chunk over its cached prefix, fresh seq 3.
        parts = [(0, 6, 7), (1, 4, 5), (2, 5, 12), (3, 0, 6)]
        logits, cu = run(parts, [0, 1, 2, 3], 2)
        for k, (s, a, b) in enumerate(parts):
            assert (logits[cu[k] : cu[k + 1]] - want[s][a:b]).abs().max().item() < 1e-5
        with pytest.raises(ValueError, match="the first num_decodes=3 sequences must hold one token each"):
            run(parts, [0, 1, 2, 3], 3)
        with pytest.raises(ValueError, match=r"num_decodes must be in \[0, 4\] \(the number of packed sequences\), "
                                             r"got 5"):
            run(parts, [0, 1, 2, 3], 5)


def test_forward_rejects_inconsistent_mode_arguments():
    model = build_model(None, args=tiny_args(), seed=0)
    cache = KVPool.for_model(model.args, 4, 4, torch.float32, "cpu")
    ids, pos = batch_inputs(B=2, T=3)
    with pytest.raises(ValueError, match="kv_cache and block_tables must be given together"):
        model(ids, pos, kv_cache=cache)
    tables = torch.zeros(2, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"decode takes one token per row \(\[B, 1\]\), got \(2, 3\)"):
        model(ids, pos, kv_cache=cache, block_tables=tables)
    with pytest.raises(ValueError, match=r"block_tables must be \[2, max_blocks\] \(one row per sequence\), "
                                         r"got \(3, 1\)"):
        model(ids[:, :1], pos[:, :1], kv_cache=cache, block_tables=torch.zeros(3, 1, dtype=torch.int32))


# ---------------------------------------------------------------- init


def test_meta_init_is_seeded_and_tied():
    args = tiny_args(tie_word_embeddings=True)
    a, b, c = (build_model(None, args=args, seed=s) for s in (7, 7, 8))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.model.layers[0].mlp.up_proj.weight, c.model.layers[0].mlp.up_proj.weight)
    assert a.lm_head.weight is a.model.embed_tokens.weight
    assert torch.equal(a.model.layers[1].self_attn.q_proj.bias, torch.zeros(64))
    assert torch.equal(a.model.norm.weight, torch.ones(64))
    std = a.model.layers[0].mlp.gate_proj.weight.std().item()
    assert abs(std - 0.02) < 0.002
    assert isinstance(a, Transformer) and build_model(None, args=args, dtype=torch.bfloat16).lm_head_weight().dtype == torch.bfloat16


# ---------------------------------------------------------------- errors


def test_user_errors(tmp_path):
    with pytest.raises(UserError, match=r"^model folder .*nope does not exist; pass a local HF model folder"):
        read_hf_config(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"config.json not found; a model folder must hold an HF config.json$"):
        load_pretrained(tmp_path / "empty")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text(json.dumps(tiny_args().to_hf_config()))
    with pytest.raises(UserError, match=r"^no weights in .*noweights: expected model.safetensors or model.safetensors.index.json$"):
        load_pretrained(tmp_path / "noweights")
    with pytest.raises(UserError, match=r"^model_type 'gpt2' is not supported by the native decoder \(supported: llama, mistral, mixtral, qwen2, qwen3, qwen3_moe\)"):
        ModelArgs.from_hf_config({"model_type": "gpt2"})
    dynamic = {**read_cfg_stub(), "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}
    with pytest.raises(UserError, match=r"^rope_type 'dynamic' is not supported by the native decoder \(supported: default, linear, llama3, yarn\)"):
        ModelArgs.from_hf_config(dynamic)


def test_user_error_when_weights_do_not_match_config(tmp_path):
    args = tiny_args()
    save_pretrained(build_model(None, args=args), args, tmp_path / "m")
    cfg = read_hf_config(tmp_path / "m")
    cfg["num_hidden_layers"] = 3
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=r"do not match its config.json: missing \['model.layers.2.input_layernorm.weight'"):
        load_pretrained(tmp_path / "m")


# ---------------------------------------------------------------- generic path


def test_generic_causal_lm_matches_transformers(tmp_path):
    config = transformers.GPT2Config(vocab_size=300, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                    bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2").eval()
    model = build_model(str(tmp_path / "gpt2"))
    assert isinstance(model, GenericCausalLM)
    model.eval()
    ids, pos = batch_inputs(T=10)
    with torch.no_grad():
        assert (model.compute_logits(model(ids, pos)) - hf(input_ids=ids).logits).abs().max().item() < 1e-4
        # Packed: two sequences of different lengths, each equal to its own unpacked forward.
        cu = torch.tensor([0, 4, 14], dtype=torch.int32)
        packed = model(torch.cat([ids[0, :4], ids[1]])[None], torch.cat([pos[0, :4], pos[1]])[None], cu_seqlens=cu)
        assert (packed[0, :4] - model(ids[:1, :4], pos[:1, :4])[0]).abs().max().item() < 1e-5
        assert (packed[0, 4:] - model(ids[1:], pos[1:])[0]).abs().max().item() < 1e-5
    with pytest.raises(NotImplementedError, match="no KV-cache path"):
        model(ids[:, :1], pos[:, :1], kv_cache=object(), cache_rows=torch.tensor([0, 1]))


def test_generic_path_for_a_native_type_matches_native(tmp_path):
    make_hf_model("qwen3_untied").save_pretrained(tmp_path / "q3")
    generic = build_model(str(tmp_path / "q3"), prefer_native=False).eval()
    native = build_model(str(tmp_path / "q3"))
    assert isinstance(generic, GenericCausalLM) and isinstance(native, Transformer)
    ids, pos = batch_inputs()
    with torch.no_grad():
        assert (generic.compute_logits(generic(ids, pos)) - native.compute_logits(native(ids, pos))).abs().max() < 1e-4


@pytest.mark.parametrize("arch", ["gpt2", "qwen3_untied"])
def test_generic_blocks_are_found_and_checkpointing_keeps_the_gradients(tmp_path, arch):
    # GPT-2 keeps its blocks in transformer.h (found through _no_split_modules); Qwen3 in
    # model.layers. Checkpointed blocks recompute in the backward: without use_cache=False the
    # recompute appended its keys to the forward's KV cache a second time (a shape error).
    import copy

    from spmd_rl.distributed.activation_checkpoint import apply_ac
    from spmd_rl.distributed.parallelize import decoder_blocks

    if arch == "gpt2":
        torch.manual_seed(0)
        transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=300, n_embd=64, n_layer=2, n_head=4,
                                                             n_positions=64)).save_pretrained(tmp_path / arch)
    else:
        make_hf_model(arch).save_pretrained(tmp_path / arch)
    plain = build_model(str(tmp_path / arch), prefer_native=False)
    blocks = decoder_blocks(plain)
    assert len(blocks) == 2 and {type(b).__name__ for b in blocks} == {"GPT2Block" if arch == "gpt2" else "Qwen3DecoderLayer"}
    checkpointed = apply_ac(copy.deepcopy(plain), "full")
    ids, pos = batch_inputs(T=10)
    cu = torch.tensor([0, 4, 14], dtype=torch.int32)
    packed = (torch.cat([ids[0, :4], ids[1]])[None], torch.cat([pos[0, :4], pos[1]])[None])
    for model in (plain, checkpointed):
        model.compute_logits(model(*packed, cu_seqlens=cu)).logsumexp(-1).sum().backward()
    grads = {n: p.grad for n, p in plain.named_parameters()}
    for name, p in checkpointed.named_parameters():
        torch.testing.assert_close(p.grad, grads[name.replace("._checkpoint_wrapped_module", "")], rtol=1e-5, atol=1e-6)


def test_unsplittable_blocks_are_the_outermost_stack():
    # _no_split_modules may list nested classes (a mixer inside a block) or a lone embedding: only
    # a ModuleList made of listed classes counts, the outermost one, so FSDP wraps children of it
    from spmd_rl.distributed.parallelize import decoder_blocks

    class Mixer(torch.nn.Linear):
        pass

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mixers = torch.nn.ModuleList([Mixer(2, 2), Mixer(2, 2)])

    class Net(torch.nn.Module):
        _no_split_modules = ["Block", "Mixer", "Embedding"]

        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(4, 2)
            self.stack = torch.nn.ModuleList([Block(), Block(), Block()])

    net = Net()
    assert decoder_blocks(net) == list(net.stack)
    # no longer a stack of blocks: the first list made only of listed classes is the block's mixers
    net.stack = torch.nn.ModuleList([Block(), torch.nn.Linear(2, 2)])
    assert decoder_blocks(net) == list(net.stack[0].mixers)
    Net._no_split_modules = ["Embedding"]
    assert decoder_blocks(net) == []


def test_stop_ids_include_a_generic_model_config_eos(tmp_path):
    from spmd_rl.trainer.components import stop_token_ids

    config = transformers.GPT2Config(vocab_size=300, n_embd=32, n_layer=1, n_head=2, n_positions=16, eos_token_id=[7, 9])
    model = GenericCausalLM(transformers.GPT2LMHeadModel(config))
    tokenizer = type("Tok", (), {"eos_token_id": 3})()
    assert stop_token_ids(tokenizer, model) == [3, 7, 9]


@pytest.mark.parametrize("random_init", [False, True])
def test_hf_engine_gets_a_transformers_model_of_a_native_decoder(tmp_path, random_init):
    # the trainer keeps the native decoder; the hf engine needs transformers' generate, so it gets
    # the same architecture as a transformers model (random init: no weights in the folder yet;
    # the first sync fills it), and the native weights load into it under their own names
    from types import SimpleNamespace

    from spmd_rl.rollout.hf import HFEngine
    from spmd_rl.rollout.weight_sync import iter_full_tensors
    from spmd_rl.trainer.components import _engine_model

    make_hf_model("qwen3_untied").save_pretrained(tmp_path / "q3")
    native = build_model(str(tmp_path / "q3"))
    if random_init:
        for weights in (tmp_path / "q3").glob("*.safetensors"):
            weights.unlink()
    cfg = SimpleNamespace(rollout=SimpleNamespace(engine="hf"),
                          model=SimpleNamespace(random_init=random_init, path=str(tmp_path / "q3"), trust_remote_code=False))
    engine_model = _engine_model(cfg, native, torch.device("cpu"), torch.float32)
    assert isinstance(engine_model, GenericCausalLM) and type(engine_model.hf_model).__name__ == "Qwen3ForCausalLM"
    engine = HFEngine(engine_model)
    engine.update_weights(iter_full_tensors(native))
    ids, pos = batch_inputs()
    with torch.no_grad():
        diff = engine.model(ids).logits - native.compute_logits(native(ids, pos))
    assert diff.abs().max() < 1e-4
