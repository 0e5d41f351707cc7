"""Generation engines: native (KV-cache) and HF outputs against full-forward references, the
engine/trainer logprob contract, sampling, seeding, stop handling and weight updates."""

from __future__ import annotations

import copy

import pytest
import torch

torch.set_num_threads(1)

from spmd_rl.errors import UserError  # noqa: E402
from spmd_rl.kernels.logprob import logprobs_from_hidden  # noqa: E402
from spmd_rl.models import build_model  # noqa: E402
from spmd_rl.models.args import ModelArgs  # noqa: E402
from spmd_rl.rollout import (  # noqa: E402
    Completion,
    RolloutEngine,
    SamplingParams,
    build_engine,
    iter_full_tensors,
    sync_weights,
)
from spmd_rl.rollout.hf import HFEngine  # noqa: E402
from spmd_rl.rollout.native import NativeEngine  # noqa: E402
from spmd_rl.rollout.sampling import (  # noqa: E402
    apply_top_k_top_p,
    make_generators,
    resolve_prompt_seeds,
    sample_seed,
    sample_tokens,
)
from spmd_rl.rollout.weight_sync import clean_param_name  # noqa: E402

VOCAB = 64
# Ragged prompt lengths in one batch.
PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [4], [12, 13, 14, 15, 16]]


def tiny_args() -> ModelArgs:
    return ModelArgs(
        architecture="LlamaForCausalLM",
        model_type="llama",
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
    )


@pytest.fixture(scope="module")
def model():
    return build_model(None, args=tiny_args(), seed=0).float().eval()


def make_engine(model, **kwargs) -> NativeEngine:
    """An engine over its own copy of ``model``."""
    return NativeEngine(copy.deepcopy(model), **kwargs)


@torch.no_grad()
def greedy_reference(model, prompt: list[int], steps: int) -> list[int]:
    """Argmax loop over the full (no cache) forward of the growing sequence."""
    seq = list(prompt)
    for _ in range(steps):
        ids = torch.tensor([seq])
        hidden = model(ids, torch.arange(len(seq))[None])  # [1, T, H]
        seq.append(int(model.compute_logits(hidden[0, -1:]).argmax(-1)))
    return seq[len(prompt) :]


@torch.no_grad()
def trainer_logprobs(
    model, prompts: list[list[int]], responses: list[list[int]], temperature: float
) -> list[torch.Tensor]:
    """Logprobs of the responses as the trainer computes them: one packed forward, then the
    lm-head logprob kernel on the positions that predict each response token."""
    seqs = [p + r for p, r in zip(prompts, responses)]
    lengths = torch.tensor([len(s) for s in seqs])
    cu = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    ids = torch.tensor([t for s in seqs for t in s])[None]
    pos = torch.cat([torch.arange(n) for n in lengths.tolist()])[None]
    hidden = model(ids, pos, cu_seqlens=cu)[0]  # [N, H]
    out = []
    for i, (p, r) in enumerate(zip(prompts, responses)):
        start = int(cu[i]) + len(p) - 1  # the last prompt token predicts the first response token
        h = hidden[start : start + len(r)]
        lp, _ = logprobs_from_hidden(h, model.lm_head_weight(), torch.tensor(r), temperature=temperature)
        out.append(lp)
    return out


def tokens_of(results: list[list[Completion]]) -> list[list[list[int]]]:
    return [[c.token_ids for c in group] for group in results]


# ------------------------------------------------------------------------- native engine


def test_greedy_matches_full_forward_argmax(model):
    engine = make_engine(model, max_num_seqs=3)  # 4 prompts: two chunks
    params = SamplingParams(temperature=0.0, max_new_tokens=12)
    results = engine.generate(PROMPTS, params)
    assert len(results) == len(PROMPTS)
    for prompt, group in zip(PROMPTS, results):
        assert len(group) == 1
        assert group[0].token_ids == greedy_reference(model, prompt, 12)
        assert group[0].finish_reason == "length"
        assert len(group[0].logprobs) == 12


@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
def test_logprobs_match_trainer(model, temperature):
    engine = make_engine(model)
    params = SamplingParams(n=2, temperature=temperature, max_new_tokens=10, seed=3)
    results = engine.generate(PROMPTS, params)
    prompts = [p for p in PROMPTS for _ in range(2)]
    comps = [c for group in results for c in group]
    # Greedy reports logprobs at T = 1.
    ref = trainer_logprobs(model, prompts, [c.token_ids for c in comps], temperature or 1.0)
    diff = max((torch.tensor(c.logprobs) - r).abs().max().item() for c, r in zip(comps, ref))
    assert diff < 1e-5


def test_n_samples_shape_and_diversity(model):
    engine = make_engine(model)
    results = engine.generate(PROMPTS, SamplingParams(n=4, temperature=1.0, max_new_tokens=8, seed=0))
    assert [len(g) for g in results] == [4] * len(PROMPTS)
    for group in results:
        assert all(len(c.token_ids) == 8 and c.finish_reason == "length" for c in group)
        assert len({tuple(c.token_ids) for c in group}) > 1


def test_stop_token_ends_response(model):
    steps = 10
    refs = [greedy_reference(model, p, steps) for p in PROMPTS]
    # A token that prompt 0's greedy path emits at step >= 2 and not before.
    k = next(i for i in range(2, steps) if refs[0][i] not in refs[0][:i])
    stop = refs[0][k]
    results = make_engine(model).generate(
        PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=steps, stop_token_ids=[stop])
    )
    reasons = []
    for ref, (comp,) in zip(refs, results):
        if stop in ref:
            cut = ref.index(stop) + 1
            assert comp.token_ids == ref[:cut] and comp.token_ids[-1] == stop
            assert comp.finish_reason == "stop" and len(comp.logprobs) == cut
        else:
            assert comp.token_ids == ref and comp.finish_reason == "length"
        reasons.append(comp.finish_reason)
    assert "stop" in reasons and "length" in reasons  # both paths exercised


def test_max_seq_len_ends_with_length(model):
    engine = make_engine(model, max_seq_len=9)
    results = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=20))
    for prompt, (comp,) in zip(PROMPTS, results):
        assert len(prompt) + len(comp.token_ids) == 9
        assert comp.token_ids == greedy_reference(model, prompt, 9 - len(prompt))
        assert comp.finish_reason == "length"
    with pytest.raises(UserError, match="prompt 1 has 7 tokens, no room left under rollout max_seq_len=7"):
        make_engine(model, max_seq_len=7).generate(PROMPTS, SamplingParams())


def test_seeds_reproducible_and_independent_of_batch(model):
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=8)
    seeds = [11, 22, 33, 44]
    engine = make_engine(model, max_num_seqs=64)
    first = engine.generate(PROMPTS, params, seeds=seeds)
    assert tokens_of(engine.generate(PROMPTS, params, seeds=seeds)) == tokens_of(first)
    assert tokens_of(engine.generate(PROMPTS, params, seeds=[1, 2, 3, 4])) != tokens_of(first)
    # params.seed = s means prompt i uses s + i.
    with_base = engine.generate(PROMPTS, SamplingParams(n=2, max_new_tokens=8, seed=11), seeds=None)
    assert tokens_of(with_base) == tokens_of(engine.generate(PROMPTS, params, seeds=[11, 12, 13, 14]))
    # Prompt 1 alone, and in chunks of 3 sequences, gives the same samples.
    alone = engine.generate([PROMPTS[1]], params, seeds=[22])
    chunked = make_engine(model, max_num_seqs=3).generate(PROMPTS, params, seeds=seeds)
    assert tokens_of(alone)[0] == tokens_of(first)[1]
    assert tokens_of(chunked) == tokens_of(first)
    for a, b in zip(alone[0], first[1]):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("changes", [dict(top_k=1), dict(top_p=1e-6)])
def test_top_k_one_and_tiny_top_p_are_greedy(model, changes):
    engine = make_engine(model)
    greedy = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=8))
    sampled = engine.generate(PROMPTS, SamplingParams(n=2, temperature=1.0, max_new_tokens=8, seed=0, **changes))
    for (g,), group in zip(greedy, sampled):
        for c in group:
            assert c.token_ids == g.token_ids
            # Both report logprobs at T = 1 before masking.
            torch.testing.assert_close(torch.tensor(c.logprobs), torch.tensor(g.logprobs), atol=1e-6, rtol=0)


def test_update_weights_and_sleep(model):
    other = build_model(None, args=tiny_args(), seed=1).float().eval()
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=8, seed=5)
    engine = make_engine(model)
    before = engine.generate(PROMPTS, params)
    target = make_engine(other).generate(PROMPTS, params)
    assert tokens_of(before) != tokens_of(target)
    sync_weights(other, engine)
    assert tokens_of(engine.generate(PROMPTS, params)) == tokens_of(target)

    assert engine.kv_cache is not None
    engine.sleep()
    assert engine.kv_cache is None
    engine.wake_up()
    assert engine.kv_cache is not None
    assert tokens_of(engine.generate(PROMPTS, params)) == tokens_of(target)
    engine.sleep()  # generate after sleep re-allocates on its own
    assert tokens_of(engine.generate(PROMPTS, params)) == tokens_of(target)

    with pytest.raises(ValueError, match="update_weights: the model has no parameter named 'model.bogus'"):
        engine.update_weights([("model.bogus", torch.zeros(1))])
    with pytest.raises(ValueError, match=r"'model.norm.weight' has shape \(3,\), the model expects \(64,\)"):
        engine.update_weights([("model.norm.weight", torch.zeros(3))])
    partial = [(n, p.detach().clone()) for n, p in engine.model.named_parameters()][:3]
    total = len(list(engine.model.named_parameters()))
    with pytest.raises(ValueError) as err:
        engine.update_weights(partial)
    assert str(err.value) == (f"update_weights: the stream ended without {total - 3} of the model's {total} parameters "
                              f"(first: 'model.layers.0.self_attn.v_proj.weight'); send every parameter, or the engine "
                              "generates from stale weights")


def test_update_weights_tied_embeddings():
    args = tiny_args().replace(tie_word_embeddings=True)
    source = build_model(None, args=args, seed=1).float()
    engine = NativeEngine(build_model(None, args=args, seed=0).float())
    # An HF-style state carries lm_head.weight too: it is the embedding, so it is accepted.
    engine.update_weights(source.state_dict().items())
    params = SamplingParams(temperature=0.0, max_new_tokens=6)
    target = NativeEngine(copy.deepcopy(source)).generate(PROMPTS, params)
    assert tokens_of(engine.generate(PROMPTS, params)) == tokens_of(target)


def test_progress_bar_counts_sequences(model, capsys):
    make_engine(model, show_progress=True, max_num_seqs=3).generate(PROMPTS, SamplingParams(n=2, max_new_tokens=3))
    assert "8/8" in capsys.readouterr().err


def test_rejects_bad_prompts(model):
    engine = make_engine(model)
    with pytest.raises(UserError, match="prompt 1 is empty; every prompt needs at least one token"):
        engine.generate([[1], []], SamplingParams())
    vocab = model.args.vocab_size
    for bad in (vocab, -1):  # the embedding would fail (a device-side assert on a GPU)
        with pytest.raises(UserError) as err:
            engine.generate([[1, 2], [3, bad]], SamplingParams())
        assert str(err.value) == (f"prompt 1 holds token id {bad}, outside the model's vocabulary [0, {vocab}): "
                                  "tokenize with the model's own tokenizer")


# ------------------------------------------------------------------------- sampling


def test_apply_top_k_top_p():
    logits = torch.log(torch.tensor([[0.2, 0.5, 0.3], [0.1, 0.15, 0.75]]))
    inf = float("-inf")
    out = apply_top_k_top_p(logits, top_k=2, top_p=1.0)
    assert torch.equal(out.isinf(), torch.tensor([[True, False, False], [True, False, False]]))
    # Nucleus: smallest sorted prefix whose mass reaches top_p; the top token always stays.
    out = apply_top_k_top_p(logits, top_k=-1, top_p=0.6)
    assert out[0].tolist() == [inf, logits[0, 1].item(), logits[0, 2].item()]
    assert out[1].tolist() == [inf, inf, logits[1, 2].item()]
    assert torch.equal(apply_top_k_top_p(logits, -1, 1.0), logits)


def test_sample_tokens_distribution_and_per_row_generators():
    probs = torch.tensor([0.1, 0.6, 0.3])
    logits = probs.log().expand(20000, 3)
    torch.manual_seed(0)
    freq = torch.bincount(sample_tokens(logits, SamplingParams()), minlength=3) / 20000
    torch.testing.assert_close(freq, probs, atol=0.015, rtol=0)
    # T = 0.5 sharpens to p^2 / sum p^2.
    freq = torch.bincount(sample_tokens(logits, SamplingParams(temperature=0.5)), minlength=3) / 20000
    torch.testing.assert_close(freq, probs**2 / (probs**2).sum(), atol=0.015, rtol=0)
    # A row's draw depends only on its generator.
    rows = torch.randn(3, 50)
    params = SamplingParams(temperature=1.0)
    together = sample_tokens(rows, params, make_generators([7, 8, 9], "cpu"))
    alone = sample_tokens(rows[2:], params, make_generators([9], "cpu"))
    assert together[2] == alone[0]
    assert torch.equal(sample_tokens(rows, SamplingParams(temperature=0.0)), rows.argmax(-1))


def test_seed_schedule():
    assert resolve_prompt_seeds(3, SamplingParams(seed=10)) == [10, 11, 12]
    assert resolve_prompt_seeds(2, SamplingParams(seed=10), seeds=[4, 5]) == [4, 5]
    torch.manual_seed(0)
    drawn = resolve_prompt_seeds(2, SamplingParams())
    torch.manual_seed(0)
    assert resolve_prompt_seeds(2, SamplingParams()) == drawn
    seeds = {sample_seed(s, j) for s in range(10) for j in range(10)}
    assert len(seeds) == 100 and all(0 <= s < 2**63 for s in seeds)
    assert sample_seed(3, 1) == sample_seed(3, 1)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n=0), "sampling n must be >= 1, got 0"),
        (dict(temperature=-1.0), "sampling temperature must be a finite number >= 0 (0 = greedy), got -1.0"),
        (dict(temperature=float("nan")), "sampling temperature must be a finite number >= 0 (0 = greedy), got nan"),
        (dict(temperature=float("inf")), "sampling temperature must be a finite number >= 0 (0 = greedy), got inf"),
        (dict(max_new_tokens=2.5), "sampling max_new_tokens must be an integer, got 2.5"),
        (dict(top_k=4.0), "sampling top_k must be an integer, got 4.0"),
        (dict(n=True), "sampling n must be an integer, got True"),
        (dict(top_p=0.0), "sampling top_p must be in (0, 1], got 0.0"),
        (dict(top_k=0), "sampling top_k must be -1 (off) or >= 1, got 0"),
        (dict(max_new_tokens=0), "sampling max_new_tokens must be >= 1, got 0"),
    ],
)
def test_sampling_params_validation(kwargs, message):
    with pytest.raises(UserError) as err:
        SamplingParams(**kwargs)
    assert str(err.value) == message


# ------------------------------------------------------------------------- factory, weight sync


def test_build_engine(model):
    engine = build_engine("native", copy.deepcopy(model), max_num_seqs=4)
    assert isinstance(engine, NativeEngine) and isinstance(engine, RolloutEngine)
    with pytest.raises(UserError) as err:
        build_engine("vllm", model)
    assert str(err.value) == "rollout.engine=vllm needs vLLM: pip install -e '.[vllm]'"
    with pytest.raises(UserError) as err:
        build_engine("tgi", model)
    assert str(err.value) == "unknown rollout engine 'tgi'; choose one of native, hf, vllm, sglang"


def test_iter_full_tensors_names():
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    names = [n for n, _ in iter_full_tensors(module)]
    assert names == list(module.state_dict().keys())
    compiled = torch.compile(module)  # wraps as _orig_mod; nothing is compiled until called
    assert [n for n, _ in iter_full_tensors(compiled)] == names
    tensors = dict(iter_full_tensors(compiled))
    assert torch.equal(tensors["0.weight"], module[0].weight)
    assert clean_param_name("model.layers.0._checkpoint_wrapped_module.mlp.w") == "model.layers.0.mlp.w"
    assert clean_param_name("_fsdp_wrapped_module.lm_head.weight") == "lm_head.weight"


# ------------------------------------------------------------------------- HF engine


@pytest.fixture(scope="module")
def hf_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(cfg).float().eval()


@torch.no_grad()
def hf_reference(model, prompt: list[int], response: list[int], temperature: float) -> torch.Tensor:
    """Logprobs of ``response`` from one unpadded forward of prompt + response."""
    logits = model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1 : -1].float()
    return torch.log_softmax(logits / temperature, -1).gather(-1, torch.tensor(response)[:, None])[:, 0]


def test_hf_greedy_matches_argmax_loop(hf_model):
    engine = HFEngine(copy.deepcopy(hf_model))
    results = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=8))
    for prompt, (comp,) in zip(PROMPTS, results):
        seq = list(prompt)
        with torch.no_grad():
            for _ in range(8):
                seq.append(int(hf_model(torch.tensor([seq])).logits[0, -1].argmax()))
        assert comp.token_ids == seq[len(prompt) :] and comp.finish_reason == "length"
        ref = hf_reference(hf_model, prompt, comp.token_ids, 1.0)
        assert (torch.tensor(comp.logprobs) - ref).abs().max() < 1e-5


def test_hf_greedy_with_n_samples_gives_n_equal_responses(hf_model, model):
    # transformers refuses num_return_sequences > 1 without sampling (validation at val_n > 1, T=0)
    engine = HFEngine(copy.deepcopy(hf_model))
    one = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=6))
    three = engine.generate(PROMPTS, SamplingParams(n=3, temperature=0.0, max_new_tokens=6))
    for (single,), group in zip(one, three):
        assert [c.token_ids for c in group] == [single.token_ids] * 3
        assert all(c.logprobs == pytest.approx(single.logprobs, abs=1e-6) for c in group)
    # a native decoder has no transformers generate: refused in one line (the trainer hands the
    # hf engine a transformers model of the same architecture instead)
    with pytest.raises(UserError, match=r"^rollout.engine=hf needs a transformers model, got Transformer: set "
                       r"model.implementation=generic, or use rollout.engine=native for this model$"):
        HFEngine(model)


def test_hf_sampling_logprobs_seeds_and_stop(hf_model):
    engine = HFEngine(copy.deepcopy(hf_model))
    params = SamplingParams(n=3, temperature=0.7, top_k=20, max_new_tokens=12, seed=1)
    results = engine.generate(PROMPTS, params)
    assert [len(g) for g in results] == [3] * len(PROMPTS)
    assert tokens_of(engine.generate(PROMPTS, params)) == tokens_of(results)
    for prompt, group in zip(PROMPTS, results):
        for comp in group:
            ref = hf_reference(hf_model, prompt, comp.token_ids, 0.7)
            assert (torch.tensor(comp.logprobs) - ref).abs().max() < 1e-5
    # Stop on a token some sample emits: it is kept as the last token.
    stop = results[0][0].token_ids[3]
    stopped = engine.generate(PROMPTS, SamplingParams(**{**params.__dict__, "stop_token_ids": [stop]}))
    for group, ref_group in zip(stopped, results):
        for comp, ref in zip(group, ref_group):
            if comp.finish_reason == "stop":
                assert comp.token_ids[-1] == stop and stop not in comp.token_ids[:-1]
            else:
                assert stop not in comp.token_ids and len(comp.token_ids) == 12
    assert stopped[0][0].token_ids == results[0][0].token_ids[: results[0][0].token_ids.index(stop) + 1]


def test_hf_update_weights(hf_model):
    from transformers import LlamaForCausalLM

    torch.manual_seed(1)
    other = LlamaForCausalLM(hf_model.config).float().eval()
    params = SamplingParams(temperature=0.0, max_new_tokens=6)
    engine = HFEngine(copy.deepcopy(hf_model))
    target = HFEngine(copy.deepcopy(other)).generate(PROMPTS, params)
    engine.update_weights(iter_full_tensors(other))
    assert tokens_of(engine.generate(PROMPTS, params)) == tokens_of(target)
    with pytest.raises(ValueError, match="update_weights: the model has no parameter named 'bogus'"):
        engine.update_weights([("bogus", torch.zeros(1))])
    assert isinstance(build_engine("hf", copy.deepcopy(hf_model)), HFEngine)
    with pytest.raises(UserError) as err:
        build_engine("native", hf_model)
    assert str(err.value) == (
        "rollout engine 'native' needs the native decoder, got LlamaForCausalLM; use rollout engine 'hf' for this model"
    )


def test_hf_max_seq_len_and_factory_kwargs(hf_model, capsys):
    engine = build_engine("hf", copy.deepcopy(hf_model), max_num_seqs=4, max_seq_len=9, device="cpu",
                          dtype=torch.float32, show_progress=True)
    results = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=20))
    assert [len(p) + len(c.token_ids) for p, (c,) in zip(PROMPTS, results)] == [9] * len(PROMPTS)
    assert all(c.finish_reason == "length" for (c,) in results)
    assert "4/4" in capsys.readouterr().err
    with pytest.raises(UserError, match="prompt 1 has 7 tokens, no room left under rollout max_seq_len=7"):
        HFEngine(copy.deepcopy(hf_model), max_seq_len=7).generate(PROMPTS, SamplingParams())


def test_hf_engine_syncs_from_generic_policy(hf_model):
    from transformers import LlamaForCausalLM

    from spmd_rl.models import GenericCausalLM

    torch.manual_seed(2)
    policy = GenericCausalLM(LlamaForCausalLM(hf_model.config).float())  # names under "hf_model."
    params = SamplingParams(temperature=0.0, max_new_tokens=6)
    target = HFEngine(copy.deepcopy(policy)).generate(PROMPTS, params)  # the wrapper is accepted
    engine = HFEngine(copy.deepcopy(hf_model))
    sync_weights(policy, engine)
    assert tokens_of(engine.generate(PROMPTS, params)) == tokens_of(target)
    assert tokens_of(target) != tokens_of(HFEngine(copy.deepcopy(hf_model)).generate(PROMPTS, params))


def test_generic_policy_exposes_its_blocks_for_fsdp_and_checkpointing(hf_model):
    """The generic transformers path has per-block FSDP units and activation checkpointing too:
    a checkpointed forward+backward equals the plain one."""
    from transformers import LlamaForCausalLM

    from spmd_rl.distributed.activation_checkpoint import apply_ac
    from spmd_rl.distributed.parallelize import decoder_blocks
    from spmd_rl.models import GenericCausalLM
    from spmd_rl.trainer.policy import PolicyModel, build_scoring_inputs

    torch.manual_seed(3)
    plain = PolicyModel(GenericCausalLM(LlamaForCausalLM(hf_model.config).float()))
    wrapped = copy.deepcopy(plain)
    assert len(decoder_blocks(plain)) == hf_model.config.num_hidden_layers
    apply_ac(wrapped, "full")
    inputs = build_scoring_inputs([[1, 2, 3], [4, 5]], [[6, 7], [8, 9, 10]], "cpu")
    for model in (plain, wrapped):
        model(inputs)[0].sum().backward()
    grads = {n.replace("_checkpoint_wrapped_module.", ""): p.grad for n, p in wrapped.named_parameters()}
    for name, p in plain.named_parameters():
        assert torch.allclose(grads[name], p.grad, atol=1e-6), name
