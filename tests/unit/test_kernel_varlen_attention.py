"""Triton packed causal attention (forward, backward) against a float64 per-sequence softmax.

Relative error = ||out - ref||_F / max(||ref||_F, 1e-12), for outputs and for each gradient;
fp32 <= 1e-4, bf16 <= 1e-2. Tiny shapes and 16-wide tiles: on CPU the kernels run in Triton's
interpreter, and lengths like 17 and 40 then span several tiles with ragged ends.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

pytest.importorskip("triton")

import spmd_rl.kernels.varlen_attention as va  # noqa: E402
from spmd_rl.kernels.varlen_attention import VarlenBlocks, varlen_attention  # noqa: E402

torch.set_num_threads(1)

SMALL = VarlenBlocks(fwd_m=16, fwd_n=16, kv_n=16, kv_m=16, q_m=16, q_n=16)
# Unequal tiles: 32-row query tiles over 16-key tiles, 32-key tiles over 16-row query tiles.
MIXED = VarlenBlocks(fwd_m=32, fwd_n=16, kv_n=32, kv_m=16, q_m=32, q_n=16)
TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-12)).item()


def reference(q, k, v, lengths, scale=None, window=None):
    """float64 ``(out [N, Hq, D], lse [Hq, N])``: explicit softmax(QK^T * scale)V per sequence and head."""
    q, k, v = q.double(), k.double(), v.double()
    N, Hq, D = q.shape
    group = Hq // k.shape[1]
    scale = D**-0.5 if scale is None else scale
    out = torch.zeros_like(q)
    lse = torch.zeros(Hq, N, dtype=torch.float64)
    start = 0
    for L in lengths:
        i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
        ok = j <= i
        if window is not None:
            ok &= i - j < window
        for h in range(Hq):
            qs, ks, vs = q[start : start + L, h], k[start : start + L, h // group], v[start : start + L, h // group]
            scores = (qs @ ks.T * scale).masked_fill(~ok, float("-inf"))
            out[start : start + L, h] = torch.softmax(scores, -1) @ vs
            lse[h, start : start + L] = torch.logsumexp(scores, -1)
        start += L
    return out, lse


def make_inputs(lengths, hq, hkv, d, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    N = sum(lengths)
    q, k, v, do = (torch.randn(N, h, d, generator=gen).to(dtype) for h in (hq, hkv, hkv, hq))
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    return q, k, v, do, cu


def check(lengths, hq, hkv, d, dtype, seed, window=None, blocks=SMALL, scale=None):
    q, k, v, do, cu = make_inputs(lengths, hq, hkv, d, dtype, seed)
    qr, kr, vr = (t.double().requires_grad_() for t in (q, k, v))
    ref, _ = reference(qr, kr, vr, lengths, scale=scale, window=window)
    ref.backward(do.double())

    qt, kt, vt = (t.clone().requires_grad_() for t in (q, k, v))
    out = varlen_attention(qt, kt, vt, cu, window=window, scale=scale, blocks=blocks)
    out.backward(do)
    assert out.dtype == dtype and out.shape == q.shape
    tol = TOL[dtype]
    for name, got, want in (("out", out, ref), ("dq", qt.grad, qr.grad), ("dk", kt.grad, kr.grad), ("dv", vt.grad, vr.grad)):
        assert got.dtype == dtype, name
        err = rel_err(got, want.detach())
        assert err <= tol, f"{name}: rel err {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hq,hkv", [(4, 2), (2, 2)])
def test_matches_float64_reference_ragged(dtype, hq, hkv):
    check([1, 17, 40, 5], hq, hkv, 16, dtype, seed=hq * 10 + hkv)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_dim_32_unequal_tiles_gqa(dtype):
    check([33, 1, 9, 64], 4, 2, 32, dtype, seed=7, blocks=MIXED)


@pytest.mark.parametrize(
    "window,dtype", [(2, torch.float32), (5, torch.float32), (20, torch.float32), (20, torch.bfloat16)]
)
def test_sliding_window(window, dtype):
    # 2 and 5: inside one tile; 20: spans tiles, so some tiles run unmasked.
    check([1, 17, 50, 5], 4, 2, 16, dtype, seed=window, window=window)


def test_window_one_attends_only_to_itself():
    # Each query sees only its own key: out = v of its kv head, dV = the group's summed dO,
    # and the softmax is constant, so dQ = dK = 0 (up to rounding of dP - delta).
    q, k, v, do, cu = make_inputs([1, 17, 20], 4, 2, 16, torch.float32, seed=1)
    qt, kt, vt = (t.clone().requires_grad_() for t in (q, k, v))
    out = varlen_attention(qt, kt, vt, cu, window=1, blocks=SMALL)
    out.backward(do)
    assert torch.allclose(out, v.repeat_interleave(2, dim=1), rtol=0, atol=1e-6)
    assert torch.allclose(vt.grad, do.view(38, 2, 2, 16).sum(2), rtol=0, atol=1e-5)
    assert qt.grad.abs().max().item() < 1e-5 and kt.grad.abs().max().item() < 1e-5


def test_sliding_window_unequal_tiles():
    check([70, 3, 40], 4, 1, 16, torch.float32, seed=11, window=37, blocks=MIXED)


def test_empty_sequences_and_custom_scale():
    check([0, 5, 0, 23], 2, 1, 16, torch.float32, seed=3, scale=0.3)


def test_default_blocks_long_sequence():
    # The default 64-wide tiles, one sequence longer than a tile next to a single token.
    check([100, 1], 2, 1, 16, torch.float32, seed=5, blocks=None)


def test_lse_is_natural_logsumexp():
    lengths = [1, 17, 40, 5]
    q, k, v, _, cu = make_inputs(lengths, 4, 2, 16, torch.float32, seed=21)
    out, lse = va.varlen_attention_forward(q, k, v, cu, 0.25, None, SMALL)
    ref_out, ref_lse = reference(q, k, v, lengths, scale=0.25)
    assert lse.shape == (4, 63) and lse.dtype == torch.float32
    assert rel_err(lse, ref_lse) <= 1e-5
    assert rel_err(out, ref_out) <= 1e-4


def test_strided_inputs_from_fused_qkv():
    # q, k, v as views of one fused projection [N, Hq + 2 Hkv, D]: row stride != heads * D.
    lengths, hq, hkv, d = [9, 20], 4, 2, 16
    gen = torch.Generator().manual_seed(4)
    qkv = torch.randn(sum(lengths), hq + 2 * hkv, d, generator=gen, requires_grad=True)
    q, k, v = qkv.split([hq, hkv, hkv], dim=1)
    cu = torch.tensor([0, 9, 29], dtype=torch.int32)
    out = varlen_attention(q, k, v, cu, blocks=SMALL)
    do = torch.randn(out.shape, generator=gen)
    out.backward(do)
    qr = qkv.detach().double().requires_grad_()
    ref, _ = reference(*qr.split([hq, hkv, hkv], dim=1), lengths)
    ref.backward(do.double())
    assert rel_err(out, ref.detach()) <= 1e-4
    assert rel_err(qkv.grad, qr.grad) <= 1e-4


def test_torch_backend_and_window_dropped_by_max_seqlen():
    lengths = [3, 12]
    q, k, v, _, cu = make_inputs(lengths, 2, 1, 16, torch.float32, seed=8)
    ref, _ = reference(q, k, v, lengths)
    assert rel_err(varlen_attention(q, k, v, cu, backend="torch"), ref) <= 1e-5
    # A window as long as the longest sequence hides nothing.
    out = varlen_attention(q, k, v, cu, window=12, max_seqlen=12, blocks=SMALL)
    assert rel_err(out, ref) <= 1e-4


def test_block_table_sorted_heaviest_first():
    # Lengths [1, 17, 40, 5] in 16-row tiles: 1 + 2 + 3 + 1 = 7 tiles, cdiv(63, 16) + 4 = 8 entries.
    # Work = keys visible to the tile's last row: (2,2)=40, (2,1)=32, (1,1)=17, (1,0)=16, (2,0)=16, (3,0)=5, (0,0)=1.
    cu = torch.tensor([0, 1, 18, 58, 63], dtype=torch.int32)
    table = va._block_table(cu, 63, 16, queries=True, window=None).view(-1, 2).tolist()
    assert table == [[2, 2], [2, 1], [1, 1], [1, 0], [2, 0], [3, 0], [0, 0], [-1, 1]]
    # Key tiles: work = query rows from the tile's start to the sequence end: 40, 24, 17, 8, 5, 1, 1.
    table = va._block_table(cu, 63, 16, queries=False, window=None).view(-1, 2).tolist()
    assert table == [[2, 0], [2, 1], [1, 0], [2, 2], [3, 0], [0, 0], [1, 1], [-1, 1]]


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash_attn is installed")
def test_flash_attn_backend_missing_package():
    q, k, v, _, cu = make_inputs([4], 2, 1, 16, torch.float32, seed=0)
    with pytest.raises(RuntimeError, match=r"^backend='flash_attn' needs the flash-attn package: pip install flash-attn$"):
        varlen_attention(q, k, v, cu, backend="flash_attn")


def test_missing_triton_message(monkeypatch):
    q, k, v, _, cu = make_inputs([4], 2, 1, 16, torch.float32, seed=0)
    monkeypatch.setattr(va, "triton", None)
    with pytest.raises(RuntimeError, match="pip install triton"):
        varlen_attention(q, k, v, cu)


@pytest.mark.parametrize(
    "kwargs,shapes,message",
    [
        ({"backend": "cuda"}, None, "backend='cuda' is not one of triton, torch, flash_attn"),
        ({}, ((5, 3, 16), (5, 2, 16)), "query heads 3 must be a multiple of kv heads 2"),
        ({}, ((5, 2, 24), (5, 1, 24)), r"head dim 24 is not supported by the triton backend; choose one of \(16, 32, 64, 128\)"),
        ({"window": 0}, None, "window must be None or a positive int; got 0"),
        ({"blocks": VarlenBlocks(fwd_m=16, fwd_n=32)}, None, "blocks.fwd_m must be a multiple of blocks.fwd_n; got 16, 32"),
        ({"blocks": VarlenBlocks(q_n=8)}, None, "blocks.q_n=8 must be a power of two >= 16"),
    ],
)
def test_bad_inputs(kwargs, shapes, message):
    qs, ks = shapes or ((5, 2, 16), (5, 1, 16))
    q, k = torch.zeros(qs), torch.zeros(ks)
    cu = torch.tensor([0, 5], dtype=torch.int32)
    with pytest.raises(ValueError, match=message):
        varlen_attention(q, k, k.clone(), cu, **kwargs)


def test_scale_default_is_inverse_sqrt_head_dim():
    # Two keys with scores (q.k) = 0 and 2 * sqrt(D): the second query's weights are softmax([0, 2]).
    d = 16
    q = torch.zeros(2, 1, d)
    q[1, 0, 0] = 2 * math.sqrt(d)
    k = torch.zeros(2, 1, d)
    k[1, 0, 0] = 1.0
    v = torch.zeros(2, 1, d)
    v[0, 0, 1], v[1, 0, 1] = 1.0, 3.0
    out = varlen_attention(q, k, v, torch.tensor([0, 2], dtype=torch.int32), blocks=SMALL)
    w = math.exp(2) / (1 + math.exp(2))
    assert out[0, 0, 1].item() == pytest.approx(1.0, rel=1e-6)
    assert out[1, 0, 1].item() == pytest.approx((1 - w) * 1.0 + w * 3.0, rel=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("d,window", [(64, None), (128, None), (128, 1000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_default_tiles_very_ragged(d, window, dtype):
    # Compiled kernels with the default tiles: lengths 1 .. 4096 in one pack, GQA 8 -> 2.
    lengths = [1, 4096, 300, 17, 2000, 64]
    q, k, v, do, cu = (t.cuda() for t in make_inputs(lengths, 8, 2, d, dtype, seed=d))
    qt, kt, vt = (t.clone().requires_grad_() for t in (q, k, v))
    out = varlen_attention(qt, kt, vt, cu, window=window)
    out.backward(do)
    qr, kr, vr = (t.double().requires_grad_() for t in (q, k, v))
    ref = va.packed_causal_attention(qr, kr, vr, cu, window=window)
    ref.backward(do.double())
    tol = TOL[dtype]
    for name, got, want in (("out", out, ref), ("dq", qt.grad, qr.grad), ("dk", kt.grad, kr.grad), ("dv", vt.grad, vr.grad)):
        err = rel_err(got, want.detach())
        assert err <= tol, f"{name}: rel err {err:.2e} > {tol:.0e}"
