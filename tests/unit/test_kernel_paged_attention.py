"""Paged decode attention: Triton kernel (interpreter on CPU) and torch reference against a
float64 oracle built from a contiguous gathering of each sequence's blocks.

Relative error = ||out - ref||_F / max(||ref||_F, tiny), ref in float64 from the same inputs.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

import spmd_rl.kernels.paged_attention as pa  # noqa: E402
from spmd_rl.kernels.attention import decode_attention  # noqa: E402
from spmd_rl.kernels.paged_attention import (  # noqa: E402
    bandwidth_bytes,
    default_num_splits,
    paged_decode_attention,
    paged_decode_attention_reference,
)

torch.set_num_threads(1)

BLOCK = 16
# Ragged: one token, exactly one block, one past a block, nearly three blocks.
LENGTHS = [1, BLOCK, BLOCK + 1, 3 * BLOCK - 2]
TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2}


def rel_err(out, ref):
    return ((out.double() - ref).norm() / max(ref.norm().item(), 1e-30)).item()


def make_paged(seed, lengths, Hq, Hkv, D, block_size, dtype, max_blocks=None, stale=float("nan")):
    """Random q and pools with each sequence's blocks at shuffled physical indices.

    Slots no sequence may read (past a length, unowned blocks) hold ``stale`` so a kernel that
    reads them shows it; unused table entries are -1.
    """
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    need = [-(-L // block_size) for L in lengths]
    max_blocks = max_blocks or max(max(need), 1)
    num_blocks = sum(need) + 3  # a few blocks nobody owns
    k_pool = torch.randn(num_blocks, block_size, Hkv, D, generator=g)
    v_pool = torch.randn(num_blocks, block_size, Hkv, D, generator=g)
    q = torch.randn(B, Hq, D, generator=g)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    table = torch.full((B, max_blocks), -1, dtype=torch.int32)
    owned = torch.zeros(num_blocks, block_size, dtype=torch.bool)
    for b, L in enumerate(lengths):
        for j in range(need[b]):
            phys = perm.pop()
            table[b, j] = phys
            owned[phys, : min(block_size, L - j * block_size)] = True
    k_pool[~owned] = stale
    v_pool[~owned] = stale
    return q.to(dtype), k_pool.to(dtype), v_pool.to(dtype), table, torch.tensor(lengths, dtype=torch.int32)


def oracle(q, k_pool, v_pool, table, lengths, scale=None, window=None):
    """Float64 attention, gathering each sequence's tokens one position at a time."""
    B, Hq, D = q.shape
    block_size, Hkv = k_pool.shape[1], k_pool.shape[2]
    scale = D**-0.5 if scale is None else scale
    out = torch.zeros(B, Hq, D, dtype=torch.float64)
    for b in range(B):
        L = int(lengths[b])
        first = max(0, L - window) if window else 0
        rows = [(int(table[b, p // block_size]), p % block_size) for p in range(first, L)]
        if not rows:
            continue
        k = torch.stack([k_pool[blk, s] for blk, s in rows]).double()  # [n, Hkv, D]
        v = torch.stack([v_pool[blk, s] for blk, s in rows]).double()
        for h in range(Hq):
            kvh = h // (Hq // Hkv)
            p = torch.softmax(k[:, kvh] @ q[b, h].double() * scale, dim=0)
            out[b, h] = p @ v[:, kvh]
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", [(4, 2), (2, 2)])
@pytest.mark.parametrize("window", [None, 20])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_kernel_matches_float64_oracle(dtype, heads, window, num_splits):
    Hq, Hkv = heads
    seed = 100 * Hq + 10 * num_splits + (window or 0) + (dtype == torch.bfloat16)
    q, kp, vp, table, lengths = make_paged(seed, LENGTHS, Hq, Hkv, 16, BLOCK, dtype)
    ref = oracle(q, kp, vp, table, lengths, window=window)
    out = paged_decode_attention(q, kp, vp, table, lengths, window=window, num_splits=num_splits, block_n=16)
    assert out.dtype == dtype and out.shape == q.shape
    assert rel_err(out, ref) <= TOL[dtype]
    torch_out = paged_decode_attention(q, kp, vp, table, lengths, window=window, backend="torch")
    assert rel_err(torch_out, ref) <= TOL[dtype]


@pytest.mark.parametrize(
    "block_size,block_n,num_splits",
    [(4, 16, 1), (4, 16, 4), (32, 16, 2), (1, 32, 2), (16, 64, 1)],
)
def test_kernel_tiles_that_straddle_or_split_pages(block_size, block_n, num_splits):
    # Tiles smaller and larger than a page, 4 splits of a 46-token context (one chunk empty),
    # head dim 24 (padded to 32 inside the kernel), a custom scale.
    lengths = [5, 46, 1, 33]
    seed = block_size * 100 + num_splits
    q, kp, vp, table, lens = make_paged(seed, lengths, 4, 2, 24, block_size, torch.float32, max_blocks=64 // block_size)
    ref = oracle(q, kp, vp, table, lens, scale=0.3)
    out = paged_decode_attention(q, kp, vp, table, lens, scale=0.3, num_splits=num_splits, block_n=block_n)
    assert rel_err(out, ref) <= 1e-4


@pytest.mark.parametrize("backend,num_splits", [("triton", 1), ("triton", 2), ("torch", None)])
def test_hand_computed_two_tokens(backend, num_splits):
    # D=2, scale 1, block size 1, the two tokens in physical blocks 1 then 0. q=[1, 0]:
    # scores 0 and ln 3 -> probs 1/4, 3/4 -> out = 1/4*[4, 0] + 3/4*[0, 8] = [1, 6].
    q = torch.tensor([[[1.0, 0.0]]])
    k_pool = torch.tensor([[[[math.log(3), 0.0]]], [[[0.0, 0.0]]]])  # [2 blocks, 1, 1, 2]
    v_pool = torch.tensor([[[[0.0, 8.0]]], [[[4.0, 0.0]]]])
    table = torch.tensor([[1, 0]], dtype=torch.int32)
    lengths = torch.tensor([2], dtype=torch.int32)
    kwargs = {"num_splits": num_splits, "block_n": 16} if backend == "triton" else {}
    out = paged_decode_attention(q, k_pool, v_pool, table, lengths, scale=1.0, backend=backend, **kwargs)
    torch.testing.assert_close(out, torch.tensor([[[1.0, 6.0]]]), atol=1e-6, rtol=0)
    # window=1: only the last token (v=[0, 8]) remains.
    out_w = paged_decode_attention(q, k_pool, v_pool, table, lengths, scale=1.0, window=1, backend=backend, **kwargs)
    torch.testing.assert_close(out_w, torch.tensor([[[0.0, 8.0]]]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("num_splits", [1, 2])
def test_padding_row_of_length_zero_gives_zeros(num_splits):
    q, kp, vp, table, lengths = make_paged(7, [0, 17], 4, 2, 16, BLOCK, torch.float32, max_blocks=2)
    for out in (
        paged_decode_attention(q, kp, vp, table, lengths, num_splits=num_splits, block_n=16),
        paged_decode_attention(q, kp, vp, table, lengths, backend="torch"),
    ):
        assert torch.equal(out[0], torch.zeros(4, 16))
        assert rel_err(out[1:], oracle(q, kp, vp, table, lengths)[1:]) <= 1e-4


def test_window_ignores_freed_blocks_before_it():
    # The first two blocks of the 46-token sequence lie wholly before a 10-token window; the
    # engine may free them, so their entries are -1 and their memory garbage.
    q, kp, vp, table, lengths = make_paged(11, [46], 2, 2, 16, BLOCK, torch.float32)
    ref = oracle(q, kp, vp, table, lengths, window=10)
    kp[table[0, :2].long()] = float("nan")
    vp[table[0, :2].long()] = float("nan")
    table[0, :2] = -1
    for ns in (1, 2):
        out = paged_decode_attention(q, kp, vp, table, lengths, window=10, num_splits=ns, block_n=16)
        assert rel_err(out, ref) <= 1e-4
    assert rel_err(paged_decode_attention(q, kp, vp, table, lengths, window=10, backend="torch"), ref) <= 1e-4
    # int64 tables and lengths are read the same way as int32 ones.
    out64 = paged_decode_attention(q, kp, vp, table.long(), lengths.long(), window=10, num_splits=2, block_n=16)
    assert rel_err(out64, ref) <= 1e-4


@pytest.mark.parametrize("window", [None, 5])
def test_reference_equals_contiguous_decode_attention(window):
    # The same keys/values laid out as decode_attention's [B, Hkv, S, D] cache and as pages.
    g = torch.Generator().manual_seed(5)
    B, Hq, Hkv, D, bs, nblk = 3, 4, 2, 8, 4, 3
    S = nblk * bs
    k_cache, v_cache = torch.randn(B, Hkv, S, D, generator=g), torch.randn(B, Hkv, S, D, generator=g)
    q = torch.randn(B, Hq, D, generator=g)
    lengths = torch.tensor([1, 7, S], dtype=torch.int32)
    table = torch.randperm(B * nblk, generator=g).view(B, nblk).int()
    k_pool = torch.empty(B * nblk, bs, Hkv, D)
    v_pool = torch.empty(B * nblk, bs, Hkv, D)
    for b in range(B):
        for j in range(nblk):
            k_pool[table[b, j]] = k_cache[b, :, j * bs : (j + 1) * bs].transpose(0, 1)
            v_pool[table[b, j]] = v_cache[b, :, j * bs : (j + 1) * bs].transpose(0, 1)
    out = paged_decode_attention_reference(q, k_pool, v_pool, table, lengths, window=window)
    expect = decode_attention(q, k_cache, v_cache, lengths, window=window)
    torch.testing.assert_close(out, expect, atol=1e-6, rtol=1e-6)


def test_default_num_splits():
    # 1 seq x 8 kv heads = 8 programs: ceil(2*132/8) = 33 wanted, capped at max_splits 32.
    assert default_num_splits(1, 8, 32768) == 32
    # ...but a 1024-token table allows only 1024 // 256 = 4 splits.
    assert default_num_splits(1, 8, 1024) == 4
    # 4 x 8 = 32 programs: ceil(264/32) = 9.
    assert default_num_splits(4, 8, 8192) == 9
    # Enough programs (>= 2 per SM) or too short a context: no split.
    assert default_num_splits(64, 8, 32768) == 1
    assert default_num_splits(2, 2, 100) == 1
    assert default_num_splits(1, 1, 4096, num_sms=2) == 4


def test_bandwidth_bytes():
    q = torch.zeros(3, 4, 8, dtype=torch.bfloat16)
    pool = torch.zeros(10, 16, 2, 8, dtype=torch.bfloat16)
    table = torch.zeros(3, 4, dtype=torch.int32)
    lengths = torch.tensor([1, 16, 40], dtype=torch.int32)
    # tokens 57; K+V: 57 * 2 heads * 8 dims * 2 bytes * 2 = 3648; q + out: 2 * 96 * 2 = 384.
    assert bandwidth_bytes(q, pool, pool, table, lengths) == 3648 + 384
    # window 10: tokens 1 + 10 + 10 = 21 -> 21 * 64 = 1344.
    assert bandwidth_bytes(q, pool, pool, table, lengths, window=10) == 1344 + 384


def test_bad_inputs():
    q, kp, vp, table, lengths = make_paged(3, [3, 5], 4, 2, 16, 4, torch.float32)
    with pytest.raises(ValueError, match="backend must be one of triton, torch, sdpa; got 'cuda'"):
        paged_decode_attention(q, kp, vp, table, lengths, backend="cuda")
    with pytest.raises(ValueError, match=r"query heads \(4\) must be a multiple of kv heads \(3\)"):
        three_heads = kp[:, :, :1].expand(-1, -1, 3, -1)
        paged_decode_attention(q, three_heads, three_heads, table, lengths)
    with pytest.raises(ValueError, match="block_size must be a power of two"):
        paged_decode_attention(q, kp[:, :3], vp[:, :3], table, lengths)
    with pytest.raises(ValueError, match=r"lengths must be \[B=2\]"):
        paged_decode_attention(q, kp, vp, table, lengths[:1])
    with pytest.raises(ValueError, match="block_tables must be int32 or int64; got torch.float32"):
        paged_decode_attention(q, kp, vp, table.float(), lengths)
    with pytest.raises(ValueError, match="must share one dtype"):
        paged_decode_attention(q.bfloat16(), kp, vp, table, lengths)
    with pytest.raises(ValueError, match="window must be None or an int >= 1; got 0"):
        paged_decode_attention(q, kp, vp, table, lengths, window=0, backend="torch")
    with pytest.raises(ValueError, match="num_splits must be an int >= 1"):
        paged_decode_attention(q, kp, vp, table, lengths, num_splits=0)
    with pytest.raises(ValueError, match="block_n must be a power of two >= 16"):
        paged_decode_attention(q, kp, vp, table, lengths, block_n=24)


def test_missing_triton_names_pip(monkeypatch):
    q, kp, vp, table, lengths = make_paged(4, [3], 2, 2, 16, 4, torch.float32)
    monkeypatch.setattr(pa, "triton", None)
    with pytest.raises(RuntimeError, match="pip install triton"):
        paged_decode_attention(q, kp, vp, table, lengths)
    # The torch path needs no triton.
    out = paged_decode_attention(q, kp, vp, table, lengths, backend="torch")
    assert rel_err(out, oracle(q, kp, vp, table, lengths)) <= 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("num_splits", [None, 1])
def test_cuda_long_context_bf16(num_splits):
    # Llama-like decode shapes: 2 seqs x 8 kv heads (32 q heads), D=128, 4k-token contexts.
    q, kp, vp, table, lengths = make_paged(9, [4000, 4096 - 3], 32, 8, 128, 16, torch.bfloat16, stale=0.0)
    ref = oracle(q, kp, vp, table, lengths)
    out = paged_decode_attention(q.cuda(), kp.cuda(), vp.cuda(), table.cuda(), lengths.cuda(), num_splits=num_splits)
    assert rel_err(out.cpu(), ref) <= 1e-2


def test_sdpa_path_matches_reference_on_finite_pools():
    """The engine's CPU path (fused SDPA over gathered blocks) equals the reference when the pool
    holds finite numbers (the engine zero-initialises it), with GQA, ragged lengths and a window."""
    g = torch.Generator().manual_seed(3)
    num_blocks, block_size, Hkv, G, D = 12, 4, 2, 3, 8
    k_pool = torch.randn(num_blocks, block_size, Hkv, D, generator=g)
    v_pool = torch.randn(num_blocks, block_size, Hkv, D, generator=g)
    q = torch.randn(3, Hkv * G, D, generator=g)
    tables = torch.tensor([[5, 2, 9], [0, 11, 3], [7, 0, 0]], dtype=torch.int32)
    lengths = torch.tensor([10, 12, 1], dtype=torch.int32)
    for window in (None, 5):
        ref = paged_decode_attention(q, k_pool, v_pool, tables, lengths, backend="torch", window=window)
        out = paged_decode_attention(q, k_pool, v_pool, tables, lengths, backend="sdpa", window=window)
        assert (out - ref).abs().max().item() < 1e-6
