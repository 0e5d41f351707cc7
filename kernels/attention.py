"""Attention for packed (varlen) training batches and for decoding against a KV cache.

These are the plain torch references: the CPU path of the native decoder and the oracle for
the Triton versions (packed varlen attention, paged decode attention) that come later beside
them. Grouped-query attention (GQA) maps query head ``h`` to kv head ``h // (Hq // Hkv)``, as
HF's ``repeat_kv`` and SDPA's ``enable_gqa`` do. An optional ``window`` restricts each query to
the last ``window`` keys including itself (Mistral's sliding window).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def packed_causal_attention(
    q: torch.Tensor,  # [N, Hq, D]
    k: torch.Tensor,  # [N, Hkv, D]
    v: torch.Tensor,  # [N, Hkv, D]
    cu_seqlens: torch.Tensor,  # [S+1] int, offsets of each sequence in the packed N tokens
    scale: float | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Causal attention within each packed sequence, never across them -> ``[N, Hq, D]``."""
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        # [1, H, L, D] views of one sequence; the batch dim keeps SDPA on its fast path.
        qs, ks, vs = (t[start:end].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        out[start:end] = causal_attention(qs, ks, vs, scale=scale, window=window)[0].transpose(0, 1)
    return out


def causal_attention(
    q: torch.Tensor,  # [B, Hq, T, D]
    k: torch.Tensor,  # [B, Hkv, T, D]
    v: torch.Tensor,  # [B, Hkv, T, D]
    scale: float | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Plain causal self-attention over full rows -> ``[B, Hq, T, D]``."""
    T = q.shape[2]
    # enable_gqa shares each kv head across its query group without materialising copies.
    if window is None or window >= T:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    pos = torch.arange(T, device=q.device)
    distance = pos[:, None] - pos[None, :]  # query minus key position
    mask = (distance >= 0) & (distance < window)  # [T, T] True = attend
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)


def decode_attention(
    q: torch.Tensor,  # [B, Hq, D] one new query per row
    k_cache: torch.Tensor,  # [B, Hkv, S, D]
    v_cache: torch.Tensor,  # [B, Hkv, S, D]
    lengths: torch.Tensor,  # [B] valid slots per row (the new token's k/v already written)
    scale: float | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Attention of one query per row over slots ``< lengths[b]`` of its cache row -> ``[B, Hq, D]``."""
    B, Hq, D = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    scale = D**-0.5 if scale is None else scale
    # Group query heads by their kv head instead of repeating the (large) cache.
    qg = q.view(B, Hkv, Hq // Hkv, D)
    scores = torch.matmul(qg, k_cache.transpose(-1, -2)).float() * scale  # [B, Hkv, G, S]
    slots = torch.arange(S, device=q.device)
    valid = slots[None, :] < lengths[:, None]  # [B, S]
    if window is not None:
        valid &= slots[None, :] >= (lengths[:, None] - window)
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v_cache.dtype)
    # Zero the unused slots too: a 0 weight times stale NaN/inf memory would still be NaN.
    v_valid = torch.where(valid[:, None, :, None], v_cache, 0.0)
    return torch.matmul(probs, v_valid).view(B, Hq, D)

