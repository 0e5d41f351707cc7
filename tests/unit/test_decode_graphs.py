"""Fixed-buffer decode steps (the CUDA-graph path without capture): padding to captured batch
sizes and the scratch block give the same generations as the engine's packed decode."""

from __future__ import annotations

import copy

import pytest
import torch

from spmd_rl.errors import UserError
from spmd_rl.models import build_model
from spmd_rl.models.args import ModelArgs
from spmd_rl.rollout import SamplingParams
from spmd_rl.rollout.native import NativeEngine
from spmd_rl.rollout.native.block_pool import KVPool
from spmd_rl.rollout.native.cuda_graph import DecodeGraphs, default_capture_sizes

torch.set_num_threads(1)

VOCAB = 64
ARGS = ModelArgs(architecture="LlamaForCausalLM", model_type="llama", vocab_size=VOCAB, hidden_size=64,
                 intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)


@pytest.fixture(scope="module")
def model():
    return build_model(None, args=ARGS, seed=0).float().eval()


def prompts_of(lengths: list[int], seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


def flat(results):
    return [c for group in results for c in group]


def test_capture_sizes():
    assert default_capture_sizes(1) == [1]
    assert default_capture_sizes(3) == [1, 2, 3]
    assert default_capture_sizes(8) == [1, 2, 4, 8]
    assert default_capture_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert default_capture_sizes(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    with pytest.raises(ValueError, match="max_num_seqs must be >= 1, got 0"):
        default_capture_sizes(0)


@pytest.mark.parametrize("changes", [
    dict(max_num_seqs=5, max_num_batched_tokens=10, block_size=4, num_blocks=10),  # chunked prefill + preemption
    dict(max_num_seqs=16, block_size=8),  # everything at once, padded to the 16 bucket
])
def test_static_decode_equals_packed_decode(model, changes):
    prompts = prompts_of([1, 3, 7, 12, 20, 5, 2], seed=3)
    preemptions = 0
    for params in (SamplingParams(temperature=0.0, max_new_tokens=9),
                   SamplingParams(n=3, temperature=0.8, top_p=0.9, max_new_tokens=9, seed=5)):
        eager = NativeEngine(copy.deepcopy(model), decode_graphs="off", **changes)
        static = NativeEngine(copy.deepcopy(model), decode_graphs="static", **changes)
        want, got = flat(eager.generate(prompts, params)), flat(static.generate(prompts, params))
        assert [c.token_ids for c in got] == [c.token_ids for c in want]
        assert [c.finish_reason for c in got] == [c.finish_reason for c in want]
        diff = max(abs(a - b) for x, y in zip(got, want) for a, b in zip(x.logprobs, y.logprobs))
        assert diff < 1e-5  # padded GEMM shapes round differently, nothing more
        assert eager.last_stats["graph_steps"] == 0
        # Most steps after the prefills are pure decode and go through the fixed buffers.
        assert static.last_stats["graph_steps"] >= static.last_stats["num_steps"] // 2
        assert static.last_stats["num_preemptions"] == eager.last_stats["num_preemptions"]
        preemptions += static.last_stats["num_preemptions"]
    if "num_blocks" in changes:
        assert preemptions > 0
        # One block beyond what the scheduler may hand out: the padding rows' scratch block.
        assert static.kv_cache.num_blocks == changes["num_blocks"] + 1
        assert static.last_stats["num_blocks"] == changes["num_blocks"]
        assert static.last_stats["peak_blocks_used"] <= changes["num_blocks"]


@torch.inference_mode()
def test_padding_rows_write_only_the_scratch_block(model):
    block_size, num_blocks = 4, 9
    pool = KVPool.for_model(ARGS, num_blocks, block_size, torch.float32, "cpu")
    for t in pool.k + pool.v:
        t.normal_()
    before = [t.clone() for t in pool.k + pool.v]
    graphs = DecodeGraphs(model, pool, max_blocks_per_seq=3, sizes=[1, 2, 4], scratch_block=8, capture=False)
    assert graphs.bucket(3) == 4 and graphs.bucket(1) == 1
    # Three sequences at positions 5, 2 and 9 of their own blocks; the fourth row is padding.
    tables = [[0, 1], [2], [3, 4, 5]]
    hidden = graphs.run([7, 8, 9], [5, 2, 9], tables)
    assert hidden.shape == (3, ARGS.hidden_size)
    written = {1 * block_size + 1, 2 * block_size + 2, 5 * block_size + 1}  # block * size + position % size
    for old, new in zip(before, pool.k + pool.v):
        old, new = old.flatten(0, 1), new.flatten(0, 1)  # [slots, Hkv, D]
        changed = {int(s) for s in (old != new).any(-1).any(-1).nonzero().flatten()}
        assert changed - set(range(8 * block_size, 9 * block_size)) == written
    # The same rows through the packed decode path (no padding) give the same hidden states.
    ids = torch.tensor([[7, 8, 9]])
    pos = torch.tensor([[5, 2, 9]])
    packed = model(ids, pos, cu_seqlens=torch.tensor([0, 1, 2, 3], dtype=torch.int32), kv_cache=pool,
                   block_tables=torch.tensor([[0, 1, 0], [2, 0, 0], [3, 4, 5]], dtype=torch.int32), num_decodes=3)
    assert (packed[0] - hidden).abs().max().item() < 1e-5


def test_bad_arguments(model):
    pool = KVPool.for_model(ARGS, 4, 4, torch.float32, "cpu")
    with pytest.raises(ValueError, match="CUDA graph capture needs a CUDA device, the KV pool is on cpu"):
        DecodeGraphs(model, pool, max_blocks_per_seq=2, sizes=[1], scratch_block=3, capture=True)
    with pytest.raises(ValueError, match="scratch_block 4 is outside the pool's 4 blocks"):
        DecodeGraphs(model, pool, max_blocks_per_seq=2, sizes=[1], scratch_block=4, capture=False)
    graphs = DecodeGraphs(model, pool, max_blocks_per_seq=2, sizes=[2, 1], scratch_block=3, capture=False)
    with pytest.raises(ValueError, match="a decode step of 3 sequences is outside the captured sizes 1..2"):
        graphs.run([1, 2, 3], [0, 0, 0], [[0], [1], [2]])
    with pytest.raises(ValueError, match="a block table is longer than the buffer's 2 blocks"):
        graphs.run([1], [0], [[0, 1, 2]])
    with pytest.raises(UserError) as err:
        NativeEngine(copy.deepcopy(model), decode_graphs="cuda")
    assert str(err.value) == "decode_graphs must be one of auto, off, static; got 'cuda'"


def test_auto_stays_eager_on_cpu(model):
    engine = NativeEngine(copy.deepcopy(model), max_num_seqs=4)
    assert engine.decode_graphs is None
    engine.generate(prompts_of([3, 4], seed=1), SamplingParams(temperature=0.0, max_new_tokens=4))
    assert engine.last_stats["graph_steps"] == 0 and engine.kv_cache.num_blocks == engine.last_stats["num_blocks"]


def test_static_decode_through_the_triton_kernel(model):
    """The fixed buffers hand the Triton decode kernel full-width block tables (most splits of a
    short context are empty); under the interpreter it agrees with the torch engine."""
    pytest.importorskip("triton")
    prompts = prompts_of([3, 6], seed=2)
    params = SamplingParams(temperature=0.0, max_new_tokens=4)
    options = dict(max_num_seqs=4, max_seq_len=64, block_size=8)
    want = flat(NativeEngine(copy.deepcopy(model), kernels="torch", decode_graphs="off", **options)
                .generate(prompts, params))
    engine = NativeEngine(copy.deepcopy(model), kernels="triton", decode_graphs="static", **options)
    got = flat(engine.generate(prompts, params))
    assert engine.last_stats["graph_steps"] == 3  # every step after the prefill
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert max(abs(a - b) for x, y in zip(got, want) for a, b in zip(x.logprobs, y.logprobs)) < 1e-4
