"""The paged KV pool: free list and reference counts, tensor layout, writes, block copies, sizing."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)

from spmd_rl.errors import UserError  # noqa: E402
from spmd_rl.models.args import ModelArgs  # noqa: E402
from spmd_rl.rollout.native.block_pool import (  # noqa: E402
    BlockAllocator,
    KVPool,
    block_nbytes,
    blocks_for_tokens,
    check_block_size,
    num_blocks_for_budget,
)


def tiny_args() -> ModelArgs:
    return ModelArgs(architecture="LlamaForCausalLM", model_type="llama", vocab_size=64, hidden_size=64,
                     intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)


def test_allocator_free_list_and_refcounts():
    alloc = BlockAllocator(4)
    assert (alloc.num_free, alloc.num_used) == (4, 0)
    a, b = alloc.allocate(), alloc.allocate()
    assert (a, b) == (0, 1)  # lowest ids first
    assert alloc.refcount(a) == 1 and alloc.num_free == 2
    alloc.share(a)
    alloc.share(a)
    assert alloc.refcount(a) == 3
    alloc.release(a)
    alloc.release(a)
    assert alloc.refcount(a) == 1 and alloc.num_free == 2  # still owned once
    alloc.release(a)
    assert alloc.refcount(a) == 0 and alloc.num_free == 3
    assert alloc.allocate() == a  # a freed block is handed out again
    c, d = alloc.allocate(), alloc.allocate()
    assert {c, d} == {2, 3} and alloc.num_free == 0 and alloc.peak_used == 4
    for blk in (a, b, c, d):
        alloc.release(blk)
    assert alloc.num_free == 4 and alloc.peak_used == 4


def test_allocator_errors():
    alloc = BlockAllocator(1)
    blk = alloc.allocate()
    with pytest.raises(ValueError) as err:
        alloc.allocate()
    assert str(err.value) == "no free KV block left (all 1 in use); check num_free before allocate"
    alloc.release(blk)
    with pytest.raises(ValueError) as err:
        alloc.release(blk)
    assert str(err.value) == "cannot release KV block 0: it is already free (double release)"
    with pytest.raises(ValueError) as err:
        alloc.share(blk)
    assert str(err.value) == "cannot share KV block 0: it is free; only allocated blocks can be shared"
    with pytest.raises(ValueError, match="num_blocks must be >= 1, got 0"):
        BlockAllocator(0)


def test_pool_layout_write_and_copy():
    pool = KVPool(num_layers=2, num_blocks=3, block_size=4, num_kv_heads=2, head_dim=5, dtype=torch.float32,
                  device="cpu")
    assert len(pool.k) == len(pool.v) == 2
    assert pool.k[0].shape == (3, 4, 2, 5)
    assert pool.nbytes() == 2 * 2 * 3 * 4 * 2 * 5 * 4  # (k, v) x layers x blocks x slots x heads x dim x fp32
    k = torch.arange(3 * 2 * 5, dtype=torch.float32).view(3, 2, 5)
    slots = torch.tensor([1, 4, 11])  # block 0 slot 1, block 1 slot 0, block 2 slot 3
    pool.write(1, slots, k, -k)
    assert torch.equal(pool.k[1][0, 1], k[0]) and torch.equal(pool.k[1][1, 0], k[1])
    assert torch.equal(pool.k[1][2, 3], k[2]) and torch.equal(pool.v[1][2, 3], -k[2])
    pool.k[0].fill_(0.0)
    pool.k[0][2] = 7.0
    pool.copy_blocks([(2, 0)])  # copy-on-write: block 2 onto block 0, every layer, k and v
    assert torch.equal(pool.k[0][0], torch.full((4, 2, 5), 7.0))
    assert torch.equal(pool.k[1][0], pool.k[1][2]) and torch.equal(pool.v[1][0], pool.v[1][2])


def test_pool_for_model_and_bytes_per_block():
    args = tiny_args()
    pool = KVPool.for_model(args, num_blocks=5, block_size=16, dtype=torch.bfloat16, device="cpu")
    assert pool.k[1].shape == (5, 16, 2, 16) and pool.k[0].dtype == torch.bfloat16
    # 2 (k, v) x 2 layers x 16 slots x 2 kv heads x 16 dims x 2 bytes
    assert block_nbytes(args, 16, torch.bfloat16) == 4096
    assert pool.nbytes() == 5 * 4096


def test_sizing_from_budget():
    args = tiny_args()
    per_block = block_nbytes(args, 16, torch.float32)  # 8192 bytes
    cpu = torch.device("cpu")
    n = num_blocks_for_budget(args, 16, torch.float32, cpu, kv_cache_gb=1 / 1024, gpu_memory_utilization=0.5)
    assert n == 2**20 // per_block == 128
    capped = num_blocks_for_budget(args, 16, torch.float32, cpu, kv_cache_gb=1.0, gpu_memory_utilization=0.5,
                                   max_blocks=40)
    assert capped == 40
    with pytest.raises(UserError) as err:
        num_blocks_for_budget(args, 16, torch.float32, cpu, kv_cache_gb=1e-9, gpu_memory_utilization=0.5)
    assert str(err.value) == ("rollout.kv_cache_gb=1e-09 leaves room for no KV block (8192 bytes each at "
                              "rollout.block_size=16); raise it or lower rollout.block_size")


def test_block_size_and_ceil():
    assert [blocks_for_tokens(n, 16) for n in (0, 1, 16, 17, 32, 33)] == [0, 1, 1, 2, 2, 3]
    check_block_size(16)
    for bad in (0, 12, -4):
        with pytest.raises(UserError) as err:
            check_block_size(bad)
        assert str(err.value) == f"rollout.block_size must be a power of two (1, 2, 4, 8, 16, 32, ...); got {bad}"
