"""The native engine's paged KV cache and continuous batching: outputs against one-at-a-time
generation and a full-recompute reference (chunked prefill, requests arriving while others run,
preemption), prefix sharing, logprobs against the trainer's, weight sync (bucketed and shared),
sleep/wake, counters and errors."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch

torch.set_num_threads(1)

from spmd_rl.config import RolloutConfig  # noqa: E402
from spmd_rl.errors import UserError  # noqa: E402
from spmd_rl.models import build_model  # noqa: E402
from spmd_rl.models.args import ModelArgs  # noqa: E402
from spmd_rl.rollout import SamplingParams, iter_full_tensors  # noqa: E402
from spmd_rl.rollout.native import NativeEngine  # noqa: E402
from spmd_rl.rollout.native.engine import native_engine_options  # noqa: E402
from spmd_rl.trainer.policy import PolicyModel, build_scoring_inputs  # noqa: E402

VOCAB = 64
PROMPT_LENS = [1, 3, 7, 12, 20, 33, 5, 2]


def tiny_args(**changes) -> ModelArgs:
    base = ModelArgs(architecture="LlamaForCausalLM", model_type="llama", vocab_size=VOCAB, hidden_size=64,
                     intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)
    return base.replace(**changes)


def make_prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def model():
    return build_model(None, args=tiny_args(), seed=0).float().eval()


def engine_over(model, **kwargs) -> NativeEngine:
    return NativeEngine(copy.deepcopy(model), **kwargs)


@torch.no_grad()
def greedy_full_recompute(model, prompt: list[int], steps: int) -> list[int]:
    """Argmax of the packed (no cache) forward over prompt + generated, one token at a time."""
    seq = list(prompt)
    for _ in range(steps):
        cu = torch.tensor([0, len(seq)], dtype=torch.int32)
        hidden = model(torch.tensor([seq]), torch.arange(len(seq))[None], cu_seqlens=cu)
        seq.append(int(model.compute_logits(hidden[0, -1]).argmax()))
    return seq[len(prompt):]


def tokens_of(results) -> list[list[list[int]]]:
    return [[c.token_ids for c in group] for group in results]


# ------------------------------------------------------------------ continuous batching


@pytest.mark.parametrize("changes", [{}, {"model_type": "mistral", "sliding_window": 6}])
def test_continuous_batching_equals_one_at_a_time_and_full_recompute(changes):
    model = build_model(None, args=tiny_args(**changes), seed=1).float().eval()
    prompts = make_prompts(PROMPT_LENS)
    params = SamplingParams(temperature=0.0, max_new_tokens=10)
    want = [greedy_full_recompute(model, p, 10) for p in prompts]

    alone = engine_over(model, max_num_seqs=1, block_size=4)
    assert tokens_of(alone.generate(prompts, params)) == [[w] for w in want]
    # 3 running at a time while 8 requests wait; 8 tokens per step: long prompts are prefilled in
    # chunks next to other sequences' decode steps.
    batched = engine_over(model, max_num_seqs=3, max_num_batched_tokens=8, block_size=4)
    assert tokens_of(batched.generate(prompts, params)) == [[w] for w in want]
    assert batched.last_stats["num_preemptions"] == 0
    # A pool of 12 blocks of 4 slots: the longest request alone needs 11, so decode runs out of
    # blocks and sequences are preempted and recomputed.
    tight = engine_over(model, max_num_seqs=4, max_num_batched_tokens=16, block_size=4, num_blocks=12)
    assert tokens_of(tight.generate(prompts, params)) == [[w] for w in want]
    assert tight.last_stats["num_preemptions"] > 0
    assert tight.last_stats["peak_blocks_used"] <= 12 and tight.last_stats["num_blocks"] == 12


def test_logprobs_match_policy_model(model):
    """Engine logprobs vs the trainer's PolicyModel on the same tokens, fp32, also under chunked
    prefill, preemption and prefix sharing."""
    prompts = make_prompts(PROMPT_LENS, seed=3)
    policy = PolicyModel(copy.deepcopy(model))
    for temperature in (1.0, 0.7):
        params = SamplingParams(n=2, temperature=temperature, max_new_tokens=9, seed=4)
        engine = engine_over(model, max_num_seqs=5, max_num_batched_tokens=10, block_size=4, num_blocks=14)
        comps = [c for group in engine.generate(prompts, params) for c in group]
        assert engine.last_stats["num_preemptions"] > 0 and engine.last_stats["prefix_hit_blocks"] > 0
        inputs = build_scoring_inputs([p for p in prompts for _ in range(2)], [c.token_ids for c in comps], "cpu")
        with torch.no_grad():
            ref, _ = policy(inputs, temperature=temperature)
        got = torch.tensor([lp for c in comps for lp in c.logprobs])
        assert got.shape == ref.shape == (sum(len(c.token_ids) for c in comps),)
        assert (got - ref).abs().max().item() < 1e-5


# ------------------------------------------------------------------ prefix sharing


def test_prefix_sharing_same_tokens_as_separate_requests(model):
    prompts = make_prompts([37, 4, 16], seed=5)
    params = SamplingParams(n=8, temperature=1.0, max_new_tokens=12, seed=7)
    shared = engine_over(model, max_num_seqs=24, block_size=16)
    out = shared.generate(prompts, params)
    assert shared.last_stats["prefix_hit_blocks"] == 7 * (3 + 1 + 1)  # 7 followers x prompt blocks
    # The 8 samples as separate sequences that each prefill the prompt, together or one at a time.
    separate = engine_over(model, max_num_seqs=24, block_size=16, enable_prefix_sharing=False)
    one_by_one = engine_over(model, max_num_seqs=1, block_size=16)
    for other in (separate, one_by_one):
        got = other.generate(prompts, params)
        assert other.last_stats["prefix_hit_blocks"] == 0
        assert tokens_of(got) == tokens_of(out)
        for g_group, o_group in zip(got, out):
            for g, o in zip(g_group, o_group):
                torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(o.logprobs), atol=1e-5, rtol=0)
    assert len({tuple(c.token_ids) for c in out[0]}) > 1  # the samples do differ


@pytest.mark.parametrize("prompt_len, shared_peak", [(32, 2 + 8), (37, 3 + 7)])
def test_prefix_sharing_block_count(model, prompt_len, shared_peak):
    """n=8 samples of one prompt hold ceil(prompt/16) shared blocks plus one tail each: a prompt
    of 32 has 2 full blocks and 8 new tails; one of 37 has a partial third block, which 7
    samples copy on their first write and the last keeps (3 + 7)."""
    prompts = make_prompts([prompt_len], seed=6)
    params = SamplingParams(n=8, temperature=1.0, max_new_tokens=4, seed=0)  # K/V stays in one tail block
    engine = engine_over(model, max_num_seqs=8, block_size=16)
    engine.generate(prompts, params)
    assert engine.last_stats["peak_blocks_used"] == shared_peak
    apart = engine_over(model, max_num_seqs=8, block_size=16, enable_prefix_sharing=False)
    apart.generate(prompts, params)
    assert apart.last_stats["peak_blocks_used"] == 8 * 3


# ------------------------------------------------------------------ weight sync


class TrackedTensors:
    """Wraps a (name, tensor) stream: yields fresh copies and records the most bytes of them
    alive at once (freed ones are counted out by a weakref finalizer)."""

    def __init__(self, named: list[tuple[str, torch.Tensor]]) -> None:
        self.named, self.alive, self.peak, self.largest = named, 0, 0, 0

    def _released(self, nbytes: int) -> None:
        self.alive -= nbytes

    def _fresh(self, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.detach().clone()
        nbytes = out.numel() * out.element_size()
        weakref.finalize(out, self._released, nbytes)
        self.alive += nbytes
        self.peak = max(self.peak, self.alive)
        self.largest = max(self.largest, nbytes)
        return out

    def __iter__(self):
        for name, tensor in self.named:
            yield name, self._fresh(tensor)  # no local keeps the copy alive


def stepped_copy(model) -> torch.nn.Module:
    """A copy of ``model`` after one AdamW step on a next-token loss (every weight moves)."""
    trainer = copy.deepcopy(model).train()
    opt = torch.optim.AdamW(trainer.parameters(), lr=3e-2)
    ids = torch.tensor([make_prompts([16], seed=9)[0]])
    hidden = trainer(ids, torch.arange(16)[None])
    loss = torch.nn.functional.cross_entropy(trainer.compute_logits(hidden[0, :-1]), ids[0, 1:])
    loss.backward()
    opt.step()
    return trainer.eval()


def test_update_weights_in_buckets_after_optimizer_step(model):
    prompts = make_prompts(PROMPT_LENS[:4], seed=2)
    params = SamplingParams(temperature=0.0, max_new_tokens=8)
    trainer = stepped_copy(model)
    target = tokens_of(engine_over(trainer).generate(prompts, params))
    bucket_mb = 0.05  # 52428 bytes: the 16-32 KiB weights of the tiny model go 2-3 per bucket
    engine = engine_over(model, update_weights_bucket_mb=bucket_mb)
    assert tokens_of(engine.generate(prompts, params)) != target
    stream = TrackedTensors(list(iter_full_tensors(trainer)))
    engine.update_weights(stream)
    assert tokens_of(engine.generate(prompts, params)) == target
    bucket = int(bucket_mb * 2**20)
    assert stream.largest == 128 * 64 * 4  # an MLP matrix
    assert stream.largest < stream.peak <= bucket  # several tensors per bucket, never more than one bucket
    assert stream.alive == 0  # the engine kept no incoming tensor
    # In an order the engine cannot predict, the bound is one bucket + one tensor.
    shuffled = TrackedTensors(list(reversed(list(iter_full_tensors(model)))))
    engine.update_weights(shuffled)
    assert shuffled.peak <= bucket + shuffled.largest
    assert tokens_of(engine.generate(prompts, params)) == tokens_of(engine_over(model).generate(prompts, params))
    # A bucket smaller than a tensor holds one tensor at a time.
    tiny = TrackedTensors(list(iter_full_tensors(trainer)))
    engine_over(model, update_weights_bucket_mb=1e-3).update_weights(tiny)
    assert tiny.peak == tiny.largest


def test_shared_weights_are_zero_copy(model):
    prompts = make_prompts(PROMPT_LENS[:4], seed=2)
    params = SamplingParams(temperature=0.0, max_new_tokens=8)
    trainer = copy.deepcopy(model)
    with torch.device("meta"):
        shell = type(model)(model.args)  # holds no weights of its own
    engine = NativeEngine(shell, share_weights_with=trainer)
    assert all(p is q for p, q in zip(engine.model.parameters(), trainer.parameters()))
    before = tokens_of(engine.generate(prompts, params))
    assert before == tokens_of(engine_over(model).generate(prompts, params))
    stepped = stepped_copy(model)
    with torch.no_grad():  # the trainer's optimizer updates its parameters in place
        for p, q in zip(trainer.parameters(), stepped.parameters()):
            p.copy_(q)

    def must_not_be_read():
        raise AssertionError("update_weights consumed the stream of a weight-sharing engine")
        yield

    engine.update_weights(must_not_be_read())
    assert tokens_of(engine.generate(prompts, params)) == tokens_of(engine_over(stepped).generate(prompts, params))
    # Replacing the trainer's parameters (as sharding does) would leave the engine on stale weights.
    trainer.model.norm.weight = torch.nn.Parameter(trainer.model.norm.weight.detach().clone())
    with pytest.raises(ValueError) as err:
        engine.update_weights(must_not_be_read())
    assert str(err.value) == ("share_weights_with: the trainer's 'model.norm.weight' is no longer the tensor the engine "
                              "shares (sharded or replaced after the engine was built); build the engine without "
                              "share_weights_with to copy weights instead")

    other = build_model(None, args=tiny_args(num_layers=1), seed=0)
    with pytest.raises(ValueError) as err:
        NativeEngine(copy.deepcopy(model), share_weights_with=other)
    assert str(err.value) == ("share_weights_with: the trainer's module has no parameter named "
                              "'model.layers.1.self_attn.q_proj.weight'; pass the unwrapped decoder of the same "
                              "architecture")
    with pytest.raises(UserError) as err:
        NativeEngine(shell, share_weights_with=trainer, dtype=torch.bfloat16)
    assert str(err.value) == ("share_weights_with: the trainer's weights are torch.float32, the engine was asked for "
                              "torch.bfloat16; leave share_weights_with unset to copy weights instead")


# ------------------------------------------------------------------ memory, counters, errors


def test_sleep_frees_pool_and_wake_up_restores(model):
    prompts = make_prompts(PROMPT_LENS[:3], seed=8)
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=6, seed=1)
    engine = engine_over(model, num_blocks=40, block_size=8)
    first = engine.generate(prompts, params)
    pool = engine.kv_cache
    assert pool.nbytes() == 40 * 2 * 2 * 8 * 2 * 16 * 4  # blocks x (k, v) x layers x slots x heads x dim x fp32
    watch = weakref.ref(pool.k[0])
    del pool
    engine.sleep()
    gc.collect()
    assert engine.kv_cache is None and watch() is None  # the pool tensors are gone
    engine.wake_up()
    assert engine.kv_cache.nbytes() == 40 * 2 * 2 * 8 * 2 * 16 * 4
    assert tokens_of(engine.generate(prompts, params)) == tokens_of(first)
    engine.sleep()  # generate after sleep reallocates on its own
    assert tokens_of(engine.generate(prompts, params)) == tokens_of(first)


def test_pool_sized_from_budget_and_capped(model):
    # 2 (k, v) x 2 layers x 16 slots x 2 heads x 16 dims x 4 bytes = 8 KiB per block.
    engine = engine_over(model, kv_cache_gb=64 * 8192 / 2**30, max_num_seqs=64, max_seq_len=2048)
    engine.wake_up()
    assert engine.kv_cache.num_blocks == 64
    capped = engine_over(model, kv_cache_gb=1.0, max_num_seqs=2, max_seq_len=40)  # 2 x ceil(39 / 16)
    capped.wake_up()
    assert capped.kv_cache.num_blocks == 6


def test_stats_progress_and_errors(model, capsys):
    prompts = make_prompts([5, 9], seed=4)
    engine = engine_over(model, show_progress=True, max_num_seqs=4)
    engine.generate(prompts, SamplingParams(n=3, temperature=1.0, max_new_tokens=5, seed=0))
    stats = engine.last_stats
    assert stats["generated_tokens"] == 2 * 3 * 5 and stats["num_preemptions"] == 0
    assert stats["prefix_hit_blocks"] == 2 * (2 * 1) and stats["seconds"] > 0
    assert set(stats) >= {"num_preemptions", "prefix_hit_blocks", "peak_blocks_used", "generated_tokens", "seconds"}
    err = capsys.readouterr().err
    assert "6/6" in err and "tok_s=" in err

    small = engine_over(model, num_blocks=2, block_size=4)
    with pytest.raises(UserError) as e:
        small.generate([[1, 2, 3, 4, 5]], SamplingParams(max_new_tokens=10))
    assert str(e.value) == (
        "a sequence of up to 15 tokens (prompt 5 + response) needs 4 KV blocks of 4 tokens but the pool holds 2; "
        "raise rollout.kv_cache_gb (rollout.gpu_memory_utilization on GPU) or lower the max_seq_len "
        "(data.max_prompt_length + data.max_response_length)"
    )
    for kwargs, message in [
        (dict(block_size=24), "rollout.block_size must be a power of two (1, 2, 4, 8, 16, 32, ...); got 24"),
        (dict(max_num_batched_tokens=0), "rollout.max_num_batched_tokens must be >= 1, got 0"),
        (dict(kv_cache_gb=0), "rollout.kv_cache_gb must be > 0 (GiB of KV cache on CPU), got 0"),
        (dict(gpu_memory_utilization=1.5), "rollout.gpu_memory_utilization must be in (0, 1], got 1.5"),
        (dict(update_weights_bucket_mb=0),
         "rollout.update_weights_bucket_mb must be > 0 (MiB per weight bucket), got 0"),
    ]:
        with pytest.raises(UserError) as e:
            engine_over(model, **kwargs)
        assert str(e.value) == message


def test_options_from_rollout_config():
    cfg = RolloutConfig(block_size=32, kv_cache_gb=2.0, max_num_batched_tokens=512, enable_prefix_sharing=False,
                        update_weights_bucket_mb=64, gpu_memory_utilization=0.7)
    assert native_engine_options(cfg, kernels="torch") == dict(
        block_size=32, kv_cache_gb=2.0, gpu_memory_utilization=0.7, max_num_batched_tokens=512,
        enable_prefix_sharing=False, update_weights_bucket_mb=64, kernels="torch", decode_graphs="auto",
    )
    assert native_engine_options(RolloutConfig(enforce_eager=True))["decode_graphs"] == "off"
