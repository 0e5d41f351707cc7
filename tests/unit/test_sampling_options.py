"""Sampling options shared by the engines: penalties, temperature, top-k/top-p/min-p truncation,
the three reported logprobs, per-request seeds, stop strings, and their validation."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

from spmd_rl.config import RolloutConfig  # noqa: E402
from spmd_rl.config_loader import ConfigError  # noqa: E402
from spmd_rl.data.tokenizer import build_char_tokenizer  # noqa: E402
from spmd_rl.errors import UserError  # noqa: E402
from spmd_rl.rollout.hf import HFEngine  # noqa: E402
from spmd_rl.rollout.sampling import (  # noqa: E402
    apply_min_p,
    apply_penalties,
    make_generators,
    process_logits,
    sample_seed,
    sample_tokens,
    sample_with_logprobs,
    sampled_logprobs,
    token_counts,
)
from spmd_rl.rollout.stop import StopChecker, StopMatch  # noqa: E402
from spmd_rl.rollout.types import Completion, SamplingParams  # noqa: E402

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
QWEN_TOKENIZER = SHARED / "assets" / "qwen2.5-tokenizer"

# A known 8-token distribution for the truncation statistics.
P = torch.tensor([0.30, 0.20, 0.15, 0.12, 0.10, 0.06, 0.04, 0.03])
NUM_DRAWS = 20000


def draw(params: SamplingParams, probs: torch.Tensor = P, num: int = NUM_DRAWS) -> torch.Tensor:
    """``num`` tokens from ``log(probs)``, one row per draw, each row with its own seeded generator."""
    logits = probs.log().expand(num, -1).contiguous()
    gens = make_generators([sample_seed(1234, j) for j in range(num)], "cpu")
    return sample_tokens(logits, params, gens)


def assert_frequencies(tokens: torch.Tensor, expected: torch.Tensor) -> None:
    """Empirical frequencies within 4 sigma of ``expected``; tokens of probability 0 never drawn."""
    freq = torch.bincount(tokens, minlength=len(expected)).double() / len(tokens)
    expected = expected.double()
    sigma = (expected * (1 - expected) / len(tokens)).sqrt()
    assert torch.all((freq - expected).abs() <= 4 * sigma + 1e-12), (freq, expected)
    assert torch.all(freq[expected == 0] == 0)


# ------------------------------------------------------------------------- truncation


@pytest.mark.parametrize(
    "options, kept",
    [
        # top-k 3: the three largest.
        (dict(top_k=3), [0.30, 0.20, 0.15, 0, 0, 0, 0, 0]),
        # top-p 0.7: mass before token 3 is 0.65 < 0.7 (kept), before token 4 is 0.77 (dropped).
        (dict(top_p=0.7), [0.30, 0.20, 0.15, 0.12, 0, 0, 0, 0]),
        # min-p 0.25: threshold 0.25 * 0.30 = 0.075 keeps p >= 0.075.
        (dict(min_p=0.25), [0.30, 0.20, 0.15, 0.12, 0.10, 0, 0, 0]),
        # T = 0.5 squares p (0.09, 0.04, 0.0225, 0.0144, 0.01, ...); top-k 5 keeps 0..4; top-p 0.9 on
        # those (mass before token 4 = 0.1669 / 0.1769 = 0.943) keeps 0..3; min-p 0.2 of the top
        # 0.09 / 0.1669 = 0.539 gives a threshold 0.108, which drops token 3 (0.0144 / 0.1669 = 0.086).
        (dict(temperature=0.5, top_k=5, top_p=0.9, min_p=0.2), [0.09, 0.04, 0.0225, 0, 0, 0, 0, 0]),
    ],
)
def test_truncation_frequencies(options, kept):
    params = SamplingParams(**options)
    expected = torch.tensor(kept) / sum(kept)  # renormalised survivors
    probs = process_logits(P.log()[None], params).softmax(-1)[0]
    torch.testing.assert_close(probs, expected, atol=1e-6, rtol=0)
    assert_frequencies(draw(params), expected)


def test_min_p_and_truncation_keep_the_top_token():
    logits = torch.tensor([[0.0, 5.0, 1.0], [2.0, 2.0, -1.0]])
    out = apply_min_p(logits, 1.0)  # only tokens as likely as the top one survive
    assert out.isfinite().tolist() == [[False, True, False], [True, True, False]]
    assert torch.equal(apply_min_p(logits, 0.0), logits)
    # Ties at the top-k boundary go to the lower id, as argmax does: greedy stays in the kept set.
    kept = process_logits(logits, SamplingParams(top_k=1)).isfinite()
    assert kept.tolist() == [[False, True, False], [True, False, False]]


# ------------------------------------------------------------------------- penalties


def test_penalties_against_hand_computed_logits():
    logits = torch.tensor([[2.0, -1.0, 0.5, -0.5, 0.0, 1.5], [2.0, -1.0, 0.5, -0.5, 0.0, 1.5]])
    prompts = [[0, 1], [5]]
    generated = [[2, 2, 3], []]
    params = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25, temperature=0.5)
    # Row 0: token 0 (prompt, > 0) 2 / 2 = 1; token 1 (prompt, <= 0) -1 * 2 = -2;
    # token 2 (twice in the output) 0.5 / 2 - 0.5 * 2 - 0.25 = -1; token 3 (once) -0.5 * 2 - 0.5 - 0.25 = -1.75;
    # tokens 4 and 5 unseen. Row 1: only token 5 (its prompt) 1.5 / 2 = 0.75.
    penalised = torch.tensor([[1.0, -2.0, -1.0, -1.75, 0.0, 1.5], [2.0, -1.0, 0.5, -0.5, 0.0, 0.75]])
    out = process_logits(logits, params, generated, prompts)
    torch.testing.assert_close(out, penalised / 0.5, atol=1e-6, rtol=0)
    # Precomputed counts give the same; the input is not modified.
    counts = process_logits(logits, params, prompt_counts=token_counts(prompts, 6),
                            output_counts=token_counts(generated, 6))
    assert torch.equal(counts, out)
    assert logits[0, 0].item() == 2.0
    assert token_counts(generated, 6)[0].tolist() == [0, 0, 2, 1, 0, 0]
    assert torch.equal(token_counts(torch.tensor([[2, 2, 3]]), 6), token_counts([[2, 2, 3]], 6))


def test_repetition_penalty_matches_hf_processor():
    from transformers import RepetitionPenaltyLogitsProcessor

    torch.manual_seed(0)
    logits = torch.randn(3, 20)
    prompts, generated = [[1, 2], [3], [4, 4, 5]], [[2, 7], [8, 9], []]
    ours = apply_penalties(logits, token_counts(prompts, 20), token_counts(generated, 20), repetition_penalty=1.3)
    hf = RepetitionPenaltyLogitsProcessor(1.3)
    for row in range(3):
        ids = torch.tensor([prompts[row] + generated[row]])
        torch.testing.assert_close(ours[row], hf(ids, logits[row : row + 1].clone())[0], atol=0, rtol=0)


def test_penalties_need_the_tokens():
    logits = torch.zeros(2, 5)
    with pytest.raises(ValueError) as err:
        sample_tokens(logits, SamplingParams(presence_penalty=1.0))
    assert str(err.value) == "sampling penalties need each row's generated tokens: pass generated= or output_counts="
    with pytest.raises(ValueError) as err:
        process_logits(logits, SamplingParams(repetition_penalty=1.2), generated=[[], []])
    assert str(err.value) == "repetition_penalty needs each row's prompt: pass prompts= or prompt_counts="
    with pytest.raises(ValueError) as err:
        process_logits(logits, SamplingParams(frequency_penalty=1.0), generated=[[1]])
    assert str(err.value) == "got generated tokens for 1 rows, the logits have 2"
    # Without penalties the token lists are not needed.
    assert torch.equal(process_logits(logits, SamplingParams(top_k=2)).isfinite().sum(-1), torch.tensor([2, 2]))


# ------------------------------------------------------------------------- greedy and logprobs


def test_greedy_is_argmax_of_penalised_logits():
    logits = torch.tensor([[3.0, 2.0, 1.0]])
    state = torch.get_rng_state()
    assert sample_tokens(logits, SamplingParams(temperature=0.0)).tolist() == [0]
    # Token 0 was in the prompt: 3 / 2 = 1.5 < 2, so token 1 wins.
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0, top_k=2)
    assert sample_tokens(logits, params, generated=[[]], prompts=[[0]]).tolist() == [1]
    out = sample_with_logprobs(logits, params, generated=[[]], prompts=[[0]])
    assert torch.equal(torch.get_rng_state(), state)  # greedy draws no randomness
    assert out.tokens.tolist() == [1]
    # Trainer-side logprob: log_softmax(raw logits) at T = 1 -> 2 - log(e^3 + e^2 + e^1).
    expected = 2.0 - math.log(math.exp(3) + math.exp(2) + math.exp(1))
    assert out.logprobs.item() == pytest.approx(expected, abs=1e-6)
    # Processed at T = 1: penalised [1.5, 2, 1], top-k 2 keeps [1.5, 2] -> 2 - log(e^1.5 + e^2).
    assert out.sampled_logprobs.item() == pytest.approx(2.0 - math.log(math.exp(1.5) + math.exp(2)), abs=1e-6)
    assert out.raw_logprobs is None


def test_sample_with_logprobs_reports_three_distributions():
    params = SamplingParams(temperature=0.5, top_k=3, return_raw_logprobs=True)
    logits = P.log().expand(64, -1).contiguous()
    seeds = [sample_seed(7, j) for j in range(64)]
    out = sample_with_logprobs(logits, params, make_generators(seeds, "cpu"))
    # Same draws as sample_tokens from the same seeds.
    assert torch.equal(out.tokens, sample_tokens(logits, params, make_generators(seeds, "cpu")))
    assert set(out.tokens.tolist()) <= {0, 1, 2}
    squared = P**2
    trainer = (squared / squared.sum()).log()  # log_softmax(log p / 0.5)
    truncated = (squared[:3] / squared[:3].sum()).log()  # the top 3, renormalised
    torch.testing.assert_close(out.logprobs, trainer[out.tokens], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.sampled_logprobs, truncated[out.tokens], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.raw_logprobs, P.log()[out.tokens], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.logprobs, sampled_logprobs(logits, out.tokens, 0.5), atol=0, rtol=0)
    # With every option off, the processed distribution is the trainer's.
    plain = sample_with_logprobs(logits, SamplingParams(temperature=0.7), make_generators(seeds, "cpu"))
    torch.testing.assert_close(plain.sampled_logprobs, plain.logprobs, atol=1e-6, rtol=0)


def test_default_params_draw_by_inverse_cdf_with_one_uniform_per_row():
    """The draw is pinned: row b takes the first token whose float64 cumulative probability of
    softmax(logits / T) exceeds u_b * total, u_b the next uniform of its own generator."""
    torch.manual_seed(0)
    logits = torch.randn(5, 30)
    gens = make_generators([1, 2, 3, 4, 5], "cpu")
    u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in make_generators([1, 2, 3, 4, 5], "cpu")])
    cdf = (logits / 0.8).softmax(-1).double().cumsum(-1)
    expected = torch.tensor([int((cdf[b] > u[b] * cdf[b, -1]).nonzero()[0]) for b in range(5)])
    assert torch.equal(sample_tokens(logits, SamplingParams(temperature=0.8), gens), expected)


# ------------------------------------------------------------------------- seeds


def fake_logits(histories: list[list[int]], vocab: int = 16) -> torch.Tensor:
    """Deterministic next-token logits ``[B, V]`` that depend on each row's own history only."""
    table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0)) * 2
    return torch.stack([table[h[-1]] + 0.1 * len(h) for h in histories])


def decode_loop(prompts: list[list[int]], seeds: list[int], params: SamplingParams, steps: int) -> list[list[int]]:
    """A batched decode loop: every row samples with its own generator and its own history."""
    gens = make_generators(seeds, "cpu")
    generated: list[list[int]] = [[] for _ in prompts]
    for _ in range(steps):
        logits = fake_logits([p + g for p, g in zip(prompts, generated)])
        tokens = sample_tokens(logits, params, gens, generated=generated, prompts=prompts)
        for row, token in enumerate(tokens.tolist()):
            generated[row].append(token)
    return generated


def test_seeded_rows_independent_of_batch_composition():
    params = SamplingParams(temperature=0.9, top_k=8, top_p=0.95, min_p=0.02, repetition_penalty=1.2,
                            presence_penalty=0.3, frequency_penalty=0.2)
    prompts = [[1, 2], [3], [4, 5, 6], [7]]
    seeds = [sample_seed(s, 0) for s in (11, 22, 33, 44)]
    together = decode_loop(prompts, seeds, params, steps=12)
    assert together == decode_loop(prompts, seeds, params, steps=12)
    for i in range(4):
        assert decode_loop([prompts[i]], [seeds[i]], params, steps=12) == [together[i]]
    order = [2, 0, 3, 1]
    shuffled = decode_loop([prompts[i] for i in order], [seeds[i] for i in order], params, steps=12)
    assert shuffled == [together[i] for i in order]
    assert decode_loop(prompts, [sample_seed(s, 1) for s in (11, 22, 33, 44)], params, steps=12) != together


# ------------------------------------------------------------------------- stop strings


@pytest.fixture(scope="module")
def qwen_tokenizer():
    """The Qwen2.5 tokenizer (byte-level BPE), skipped when the shared asset is not there."""
    if not QWEN_TOKENIZER.is_dir():
        pytest.skip(f"../shared/assets/qwen2.5-tokenizer not found: {QWEN_TOKENIZER}")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(QWEN_TOKENIZER))


@pytest.fixture(scope="module", params=["qwen", "char"])
def tokenizer(request, tmp_path_factory):
    """The Qwen2.5 tokenizer when the shared asset is there, and always a char-level one."""
    if request.param == "qwen":
        return request.getfixturevalue("qwen_tokenizer")
    return build_char_tokenizer(str(tmp_path_factory.mktemp("char_tokenizer")))


class CountingTokenizer:
    """Wraps a tokenizer and records the length of every ``decode`` call."""

    def __init__(self, tokenizer):
        self.tokenizer, self.lengths = tokenizer, []

    def decode(self, ids, **kwargs):
        self.lengths.append(len(ids))
        return self.tokenizer.decode(ids, **kwargs)


def first_stop_by_scan(checker: StopChecker, ids: list[int]) -> int | None:
    """Reference: call ``check`` after every token, as a decode loop does; the cut it reports."""
    for k in range(1, len(ids) + 1):
        match = checker.check(ids[:k])
        if match is not None:
            assert match.num_tokens == k  # found on the token that completes the stop string
            return k
    return None


TEXT = "so the answer is 42. then we add 7 more and stop here. done"


@pytest.mark.parametrize("stops, before", [
    (["answer is"], "so the "),
    ([". "], "so the answer is 42"),
    (["stop", "add"], "so the answer is 42. then we "),  # the one that appears first wins
    (["7 more", "e"], "so th"),
])
def test_stop_string_keeps_shortest_token_prefix(tokenizer, stops, before):
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    checker = StopChecker(tokenizer, stops)
    match = checker.find(ids)
    k = match.num_tokens
    kept = tokenizer.decode(ids[:k])
    # The kept tokens spell the stop string; one token fewer does not.
    assert any(s in kept for s in stops) and not any(s in tokenizer.decode(ids[: k - 1]) for s in stops)
    assert match.stop in kept and match.text_before(kept) == before
    assert first_stop_by_scan(checker, ids) == k


def test_stop_string_not_found_and_no_stop_strings(tokenizer):
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert StopChecker(tokenizer, ["zzz"]).find(ids) is None
    assert first_stop_by_scan(StopChecker(tokenizer, ["zzz"]), ids) is None
    assert StopChecker(tokenizer, []).check(ids) is None and not StopChecker(tokenizer, [])
    assert StopChecker(tokenizer, ["so"]).check([]) is None
    with pytest.raises(ValueError) as err:
        StopChecker(tokenizer, ["ok", ""])
    assert str(err.value) == "stop strings must be non-empty strings, got ['ok', '']"


def test_stop_check_decodes_only_a_tail_window(tokenizer):
    ids = tokenizer(TEXT * 8, add_special_tokens=False)["input_ids"]
    counting = CountingTokenizer(tokenizer)
    checker = StopChecker(counting, ["zzz"])
    assert checker.context_tokens == 4 * 3 + 4
    for k in range(1, len(ids) + 1):
        assert checker.check(ids[:k]) is None
    assert max(counting.lengths) == checker.context_tokens + 1 < len(ids)
    # With several new tokens the window grows by them.
    counting.lengths.clear()
    checker.check(ids, num_new=5)
    assert counting.lengths == [checker.context_tokens + 5]


def test_stop_string_across_special_tokens(tokenizer):
    """Special tokens decode to no text: a run of them inside a stop string is not counted in
    the check's window, so the string is still found on the token that completes it."""
    special = tokenizer.all_special_ids[0]
    a, b = (tokenizer(c, add_special_tokens=False)["input_ids"][0] for c in "ab")
    ids = [a] + [special] * 40 + [b]
    checker = StopChecker(tokenizer, ["ab"])
    assert checker.find(ids).num_tokens == len(ids)
    assert first_stop_by_scan(checker, ids) == len(ids)


def test_stop_string_multibyte_and_partial_tokens(qwen_tokenizer):
    tok = qwen_tokenizer
    text = "the answer is <answer>7</answer> then 世界你好 🎉 done"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    # A stop string inside a token keeps the whole token: "answ" ends in the token " answer".
    match = StopChecker(tok, ["answ"]).find(ids)
    assert tok.decode(ids[: match.num_tokens]) == "the answer"
    for stop, kept in [("</answer>", "the answer is <answer>7</answer>"),
                       ("世界", "the answer is <answer>7</answer> then 世界"),
                       ("🎉", "the answer is <answer>7</answer> then 世界你好 🎉")]:
        checker = StopChecker(tok, [stop])
        k = checker.find(ids).num_tokens
        assert tok.decode(ids[:k]) == kept
        assert first_stop_by_scan(checker, ids) == k
    # The emoji spans several byte tokens: the ones before its last byte do not complete it.
    assert "🎉" not in tok.decode(ids[: k - 1])


# ------------------------------------------------------------------------- the HF engine


@pytest.fixture(scope="module")
def char_setup(tmp_path_factory):
    """A char tokenizer and a random tiny Llama over its vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_char_tokenizer(str(tmp_path_factory.mktemp("char_tok_engine")))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return tok, LlamaForCausalLM(cfg).float().eval()


def engine_prompts(tok) -> list[list[int]]:
    return [tok(t, add_special_tokens=False)["input_ids"] for t in ("12+3=", "a b c", "7*8=", "hello")]


@torch.no_grad()
def reference_greedy(model, prompt: list[int], steps: int, params: SamplingParams) -> list[int]:
    """Full-forward argmax loop over process_logits (T = 1): what greedy with penalties must give."""
    seq = list(prompt)
    for _ in range(steps):
        logits = model(torch.tensor([seq])).logits[0, -1:].float()
        out = process_logits(logits, params, generated=[seq[len(prompt):]], prompts=[prompt])
        seq.append(int(out.argmax(-1)))
    return seq[len(prompt):]


def test_hf_greedy_with_penalties_matches_reference(char_setup):
    tok, model = char_setup
    params = SamplingParams(temperature=0.0, max_new_tokens=10, repetition_penalty=1.5, frequency_penalty=1.0,
                            presence_penalty=0.5)
    results = HFEngine(copy.deepcopy(model)).generate(engine_prompts(tok), params)
    plain = HFEngine(copy.deepcopy(model)).generate(engine_prompts(tok), SamplingParams(temperature=0.0,
                                                                                      max_new_tokens=10))
    for prompt, (comp,) in zip(engine_prompts(tok), results):
        assert comp.token_ids == reference_greedy(model, prompt, 10, params)
        assert comp.finish_reason == "length" and comp.stop_reason is None
    assert [c.token_ids for (c,) in results] != [c.token_ids for (c,) in plain]  # the penalties acted


@torch.no_grad()
def test_hf_sampling_reports_processed_and_raw_logprobs(char_setup):
    tok, model = char_setup
    params = SamplingParams(n=3, temperature=0.8, top_k=10, top_p=0.9, min_p=0.05, repetition_penalty=1.2,
                            frequency_penalty=0.3, max_new_tokens=8, seed=3, return_raw_logprobs=True)
    engine = HFEngine(copy.deepcopy(model))
    results = engine.generate(engine_prompts(tok), params)
    assert [[c.token_ids for c in g] for g in engine.generate(engine_prompts(tok), params)] == \
        [[c.token_ids for c in g] for g in results]
    for prompt, group in zip(engine_prompts(tok), results):
        for comp in group:
            logits = model(torch.tensor([prompt + comp.token_ids])).logits[0, len(prompt) - 1 : -1].float()
            targets = torch.tensor(comp.token_ids)
            processed = torch.cat([
                process_logits(logits[t : t + 1], params, generated=[comp.token_ids[:t]], prompts=[prompt])
                for t in range(len(comp.token_ids))
            ])
            ref_sampled = processed.log_softmax(-1).gather(-1, targets[:, None])[:, 0]
            ref_trainer = (logits / 0.8).log_softmax(-1).gather(-1, targets[:, None])[:, 0]
            ref_raw = logits.log_softmax(-1).gather(-1, targets[:, None])[:, 0]
            torch.testing.assert_close(torch.tensor(comp.sampled_logprobs), ref_sampled, atol=1e-5, rtol=0)
            torch.testing.assert_close(torch.tensor(comp.logprobs), ref_trainer, atol=1e-5, rtol=0)
            torch.testing.assert_close(torch.tensor(comp.raw_logprobs), ref_raw, atol=1e-5, rtol=0)
            assert processed.gather(-1, targets[:, None]).isfinite().all()  # never a truncated token


def brute_force_cut(tok, tokens: list[int], stop: str) -> int | None:
    for k in range(1, len(tokens) + 1):
        if stop in tok.decode(tokens[:k], skip_special_tokens=True):
            return k
    return None


def test_hf_stop_strings_eos_and_max_tokens(char_setup):
    tok, model = char_setup
    prompts = engine_prompts(tok)
    free = HFEngine(copy.deepcopy(model)).generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=16))
    ref = free[0][0].token_ids
    text = tok.decode(ref, skip_special_tokens=True)
    stop = text[4:6]  # two characters prompt 0's greedy response spells
    engine = HFEngine(copy.deepcopy(model), tokenizer=tok)
    results = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=16, stop=[stop]))
    reasons = set()
    for (free_comp,), (comp,) in zip(free, results):
        cut = brute_force_cut(tok, free_comp.token_ids, stop)
        if cut is None:  # never spelled: runs to max_new_tokens
            assert comp.token_ids == free_comp.token_ids and comp.finish_reason == "length"
            assert len(comp.token_ids) == 16
        else:
            assert comp.token_ids == free_comp.token_ids[:cut]
            assert comp.finish_reason == "stop" and comp.stop_reason == stop
            assert comp.logprobs == pytest.approx(free_comp.logprobs[:cut], abs=1e-6)
            assert len(comp.sampled_logprobs) == cut
        reasons.add(comp.finish_reason)
    assert results[0][0].finish_reason == "stop"
    # A stop token before the stop string wins, and is kept.
    cut = brute_force_cut(tok, ref, stop)
    eos = ref[1]
    if eos not in ref[:1]:
        (comp,) = engine.generate([prompts[0]], SamplingParams(temperature=0.0, max_new_tokens=16, stop=[stop],
                                                               stop_token_ids=[eos]))[0]
        assert comp.token_ids == ref[:2] and comp.finish_reason == "stop" and comp.stop_reason == eos
        assert cut > 2
    with pytest.raises(ValueError) as err:
        HFEngine(copy.deepcopy(model)).generate(prompts, SamplingParams(stop=["x"]))
    assert str(err.value) == "sampling stop strings need a tokenizer: build the HF engine with tokenizer=..."


# ------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(min_p=-0.1), "sampling min_p must be in [0, 1] (0 = off), got -0.1"),
        (dict(min_p=1.5), "sampling min_p must be in [0, 1] (0 = off), got 1.5"),
        (dict(repetition_penalty=0.0), "sampling repetition_penalty must be > 0 (1 = off), got 0.0"),
        (dict(presence_penalty=2.5), "sampling presence_penalty must be in [-2, 2] (0 = off), got 2.5"),
        (dict(frequency_penalty=-3.0), "sampling frequency_penalty must be in [-2, 2] (0 = off), got -3.0"),
        (dict(stop=["</answer>", ""]), "sampling stop must be a list of non-empty strings, got ['</answer>', '']"),
        (dict(stop=[3]), "sampling stop must be a list of non-empty strings, got [3]"),
        (dict(return_raw_logprobs="yes"), "sampling return_raw_logprobs must be true or false, got 'yes'"),
    ],
)
def test_sampling_params_validation(kwargs, message):
    with pytest.raises(UserError) as err:
        SamplingParams(**kwargs)
    assert str(err.value) == message


def test_defaults_are_off_and_single_stop_string():
    params = SamplingParams()
    assert (params.min_p, params.repetition_penalty, params.presence_penalty, params.frequency_penalty) == (0, 1, 0, 0)
    assert params.stop == [] and params.return_raw_logprobs is False and not params.has_penalties
    assert SamplingParams(stop="</answer>").stop == ["</answer>"]
    assert SamplingParams(frequency_penalty=0.1).has_penalties


def test_completion_optional_fields():
    comp = Completion([1, 2], [-0.1, -0.2], "stop")
    assert comp.sampled_logprobs is None and comp.raw_logprobs is None and comp.stop_reason is None
    with pytest.raises(ValueError) as err:
        Completion([1, 2], [-0.1, -0.2], "stop", sampled_logprobs=[-0.1])
    assert str(err.value) == "Completion has 2 tokens but 1 sampled_logprobs"
    assert StopMatch(3, "ab").text_before("xxabyy") == "xx"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(min_p=2.0), "min_p: must be in [0, 1] (0 = off)"),
        (dict(repetition_penalty=-1.0), "repetition_penalty: must be > 0 (1 = off)"),
        (dict(presence_penalty=-2.5), "presence_penalty: must be in [-2, 2] (0 = off)"),
        (dict(frequency_penalty=9.0), "frequency_penalty: must be in [-2, 2] (0 = off)"),
        (dict(stop=[""]), "stop: must be a list of non-empty strings"),
    ],
)
def test_rollout_config_validation(kwargs, message):
    with pytest.raises(ConfigError) as err:
        RolloutConfig(**kwargs)
    assert str(err.value) == message
