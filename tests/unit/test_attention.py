"""Attention references against a naive per-sequence softmax(QK^T)V."""

from __future__ import annotations

import math

import pytest
import torch

from spmd_rl.kernels.attention import causal_attention, decode_attention, packed_causal_attention

torch.set_num_threads(1)


def naive_attention(q, k, v, key_ok):
    """q [Hq, Tq, D], k/v [Hkv, Tk, D], key_ok [Tq, Tk] bool -> [Hq, Tq, D]; written out longhand."""
    groups = q.shape[0] // k.shape[0]
    out = torch.empty_like(q)
    for h in range(q.shape[0]):
        kh, vh = k[h // groups], v[h // groups]
        scores = q[h] @ kh.T / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(~key_ok, float("-inf"))
        out[h] = torch.softmax(scores, dim=-1) @ vh
    return out


def causal_ok(T, window=None):
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    ok = j <= i
    return ok & (i - j < window) if window else ok


@pytest.mark.parametrize("window", [None, 3])
def test_packed_matches_naive_per_sequence(window):
    torch.manual_seed(0)
    lengths = [4, 1, 7, 0, 5]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    N = sum(lengths)
    q, k, v = torch.randn(N, 4, 8), torch.randn(N, 2, 8), torch.randn(N, 2, 8)
    out = packed_causal_attention(q, k, v, cu, window=window)
    for s, L in enumerate(lengths):
        a, b = int(cu[s]), int(cu[s + 1])
        if L == 0:
            continue
        ref = naive_attention(q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1), causal_ok(L, window))
        torch.testing.assert_close(out[a:b], ref.transpose(0, 1), atol=1e-6, rtol=1e-5)


def test_packed_custom_scale():
    torch.manual_seed(1)
    q, k, v = torch.randn(6, 2, 8), torch.randn(6, 2, 8), torch.randn(6, 2, 8)
    cu = torch.tensor([0, 6], dtype=torch.int32)
    out = packed_causal_attention(q, k, v, cu, scale=0.5)
    # scale=0.5 on q·k equals the default 1/sqrt(8) scale on (q * 0.5 * sqrt(8))·k
    ref = packed_causal_attention(q * 0.5 * math.sqrt(8), k, v, cu)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 4])
def test_batch_causal_matches_naive(window):
    torch.manual_seed(2)
    q, k, v = torch.randn(2, 6, 9, 8), torch.randn(2, 3, 9, 8), torch.randn(2, 3, 9, 8)
    out = causal_attention(q, k, v, window=window)
    for b in range(2):
        torch.testing.assert_close(out[b], naive_attention(q[b], k[b], v[b], causal_ok(9, window)), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 2])
def test_decode_matches_naive(window):
    torch.manual_seed(3)
    B, Hq, Hkv, S, D = 3, 4, 2, 10, 8
    q, k_cache, v_cache = torch.randn(B, Hq, D), torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, D)
    lengths = torch.tensor([1, 6, 10])
    out = decode_attention(q, k_cache, v_cache, lengths, window=window)
    for b in range(B):
        L = int(lengths[b])
        ok = torch.arange(L)[None, :] >= (L - window if window else 0)
        ref = naive_attention(q[b][:, None], k_cache[b, :, :L], v_cache[b, :, :L], ok)[:, 0]
        torch.testing.assert_close(out[b], ref, atol=1e-6, rtol=1e-5)


def test_decode_ignores_slots_past_length():
    torch.manual_seed(4)
    q, k_cache, v_cache = torch.randn(1, 2, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    lengths = torch.tensor([3])
    out = decode_attention(q, k_cache, v_cache, lengths)
    k_cache[:, :, 3:] = 1e4  # garbage beyond the valid length must not matter
    v_cache[:, :, 3:] = float("nan")
    assert torch.equal(decode_attention(q, k_cache, v_cache, lengths), out)
