"""Packed (varlen) causal attention in Triton, forward and backward.

FlashAttention-2 (Dao 2023, arXiv:2307.08691) over a packed batch: ``N`` tokens of ``S``
sequences laid end to end, sequence ``s`` at rows ``cu_seqlens[s]:cu_seqlens[s+1]``. Each query
attends causally within its own sequence, never across, optionally only to the last ``window``
keys including itself (Mistral's sliding window, arXiv:2310.06825). Grouped-query attention
(Ainslie et al. 2023, arXiv:2305.13245) maps query head ``h`` to kv head ``h // (Hq // Hkv)``.

Design
- Block tables. Programs are mapped to (sequence, block) pairs by a table built from
  ``cu_seqlens`` with device-side torch ops (nothing is read back to the host, so no sync),
  and a sequence of length 1 costs one program, not ``max_seqlen / BLOCK``. The grid is sized by the
  upper bound ``cdiv(N, BLOCK) + S`` known from shapes alone; surplus entries exit at once. The
  table is sorted by estimated work, heaviest first (longest-processing-time order), so the
  long tail of a long sequence's causal blocks does not start last.
- Forward: one program per (query block, query head), online softmax in base 2
  (Milakov & Gimelshein 2018, arXiv:1805.02867), fp32 accumulators. Key blocks that need no
  mask (strictly below the diagonal and fully inside the window) run an unmasked loop; only
  the diagonal and window-edge blocks pay for the mask. Saves the logsumexp ``[Hq, N]`` fp32.
- Backward: ``delta = rowsum(dO * O)`` first; then dK/dV with one program per (key block,
  kv head) that loops over the query heads of its GQA group, summing their contributions in
  registers (no per-query-head ``[N, Hq, D]`` buffers, no reduction pass, no atomics); then
  dQ with one program per (query block, query head) that recomputes the probabilities
  (deterministic, no fp32 atomics contending on dQ rows, at the price of one more QK^T).

The torch reference is :func:`spmd_rl.kernels.attention.packed_causal_attention`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from spmd_rl.kernels.attention import packed_causal_attention

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch backend works without triton
    triton = None
    tl = None

BACKENDS = ("triton", "torch", "flash_attn")
HEAD_DIMS = (16, 32, 64, 128)
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class VarlenBlocks:
    """Tile sizes of the three kernels (powers of two >= 16).

    ``fwd_m`` queries x ``fwd_n`` keys in the forward (``fwd_m % fwd_n == 0``); ``kv_n`` keys x
    ``kv_m`` queries in the dK/dV kernel (``kv_n % kv_m == 0``); ``q_m`` queries x ``q_n`` keys in
    the dQ kernel (``q_m % q_n == 0``). The divisibility keeps every diagonal inside whole tiles.
    """

    fwd_m: int = 64
    fwd_n: int = 64
    kv_n: int = 64
    kv_m: int = 32
    q_m: int = 64
    q_n: int = 32
    num_warps: int = 4
    num_stages: int = 2


def default_blocks(head_dim: int, dtype: torch.dtype = torch.bfloat16) -> VarlenBlocks:
    """H100 defaults (untimed guesses): 64-wide tiles suit ragged RL batches of short and long
    sequences; wider heads get more warps to keep the fp32 accumulators in registers. Every
    default fits H100's 227 KiB of shared memory per program (checked by compiling for sm_90;
    fp32 at D=128 with 128-row query tiles would need 256 KiB, hence 64 there)."""
    if head_dim >= 128:
        fwd_m = 64 if dtype == torch.float32 else 128
        return VarlenBlocks(fwd_m=fwd_m, fwd_n=64, num_warps=8, num_stages=2)
    return VarlenBlocks(num_warps=4, num_stages=3)


def varlen_attention(
    q: torch.Tensor,  # [N, Hq, D]
    k: torch.Tensor,  # [N, Hkv, D]
    v: torch.Tensor,  # [N, Hkv, D]
    cu_seqlens: torch.Tensor,  # [S+1] int32 offsets, 0 = cu_seqlens[0] <= ... <= cu_seqlens[S] = N
    *,
    scale: float | None = None,
    window: int | None = None,
    max_seqlen: int | None = None,
    backend: str = "triton",
    blocks: VarlenBlocks | None = None,
) -> torch.Tensor:
    """Causal attention within each packed sequence -> ``[N, Hq, D]`` in ``q``'s dtype; autograd-aware.

    ``scale`` defaults to ``D**-0.5``; ``window`` keeps the last ``window`` keys including the
    query itself. ``max_seqlen`` (the longest sequence) is only needed by ``flash_attn``; when
    given, a window at least that long is dropped. ``blocks`` overrides the Triton tile sizes.
    ``cu_seqlens`` values are not checked (that would cost a host sync per call).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {', '.join(BACKENDS)}")
    _check_inputs(q, k, v, cu_seqlens, window)
    if window is not None and max_seqlen is not None and window >= max_seqlen:
        window = None  # every key of every sequence is inside the window
    if backend == "torch":
        return packed_causal_attention(q, k, v, cu_seqlens, scale=scale, window=window)
    if backend == "flash_attn":
        return _flash_attn(q, k, v, cu_seqlens, scale, window, max_seqlen)
    _require_triton()
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"head dim {q.shape[-1]} is not supported by the triton backend; choose one of {HEAD_DIMS}")
    if q.dtype not in _DTYPES:
        raise ValueError(f"dtype {q.dtype} is not supported by the triton backend; choose one of {_DTYPES}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    blocks = default_blocks(q.shape[-1], q.dtype) if blocks is None else blocks
    _check_blocks(blocks)
    return _VarlenAttention.apply(q, k, v, cu_seqlens, scale, window, blocks)


def varlen_attention_forward(
    q: torch.Tensor,  # [N, Hq, D]
    k: torch.Tensor,  # [N, Hkv, D]
    v: torch.Tensor,  # [N, Hkv, D]
    cu_seqlens: torch.Tensor,  # [S+1] int32
    scale: float,
    window: int | None,
    blocks: VarlenBlocks,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton forward without autograd -> ``(out [N, Hq, D], lse [Hq, N] fp32)``, ``lse`` the natural
    logsumexp of each query's scaled scores (what the backward needs to recompute probabilities)."""
    _require_triton()
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    N, Hq, D = q.shape
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    out = torch.empty((N, Hq, D), device=q.device, dtype=q.dtype)
    lse = torch.empty((Hq, N), device=q.device, dtype=torch.float32)
    if N == 0:
        return out, lse
    table = _block_table(cu, N, blocks.fwd_m, queries=True, window=window)
    grid = (Hq * (table.shape[0] // 2),)
    _fwd_kernel[grid](
        q, k, v, out, lse, cu, table,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1),
        N, Hq, Hq // k.shape[1], window or 0, scale * _LOG2E,
        HEAD_DIM=D, BLOCK_M=blocks.fwd_m, BLOCK_N=blocks.fwd_n, HAS_WINDOW=window is not None,
        DOT_PRECISION=_dot_precision(q.dtype),
        **_launch_options(blocks),
    )  # fmt: skip
    return out, lse


def varlen_attention_backward(
    do: torch.Tensor,  # [N, Hq, D]
    q: torch.Tensor,  # [N, Hq, D]
    k: torch.Tensor,  # [N, Hkv, D]
    v: torch.Tensor,  # [N, Hkv, D]
    out: torch.Tensor,  # [N, Hq, D] the forward's output
    lse: torch.Tensor,  # [Hq, N] fp32 the forward's logsumexp
    cu_seqlens: torch.Tensor,  # [S+1] int32
    scale: float,
    window: int | None,
    blocks: VarlenBlocks,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton backward -> ``(dq [N, Hq, D], dk [N, Hkv, D], dv [N, Hkv, D])`` in the inputs' dtypes."""
    _require_triton()
    do = do.to(q.dtype)  # the dots pair dO with q/k/v tiles of one dtype
    do, q, k, v, out = (_last_dim_contiguous(t) for t in (do, q, k, v, out))
    N, Hq, D = q.shape
    Hkv = k.shape[1]
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    if N == 0:
        return dq, dk, dv
    opts = _launch_options(blocks)
    prec = _dot_precision(q.dtype)
    has_window = window is not None

    delta = torch.empty((Hq, N), device=q.device, dtype=torch.float32)
    pre_rows = 64
    _bwd_delta_kernel[(triton.cdiv(N, pre_rows), Hq)](
        out, do, delta, out.stride(0), out.stride(1), do.stride(0), do.stride(1), N,
        HEAD_DIM=D, BLOCK=pre_rows,
    )  # fmt: skip

    kv_table = _block_table(cu, N, blocks.kv_n, queries=False, window=window)
    _bwd_dkdv_kernel[(Hkv * (kv_table.shape[0] // 2),)](
        q, k, v, do, lse, delta, dk, dv, cu, kv_table,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        do.stride(0), do.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        N, Hkv, Hq // Hkv, window or 0, scale * _LOG2E, scale,
        HEAD_DIM=D, BLOCK_N=blocks.kv_n, BLOCK_M=blocks.kv_m, HAS_WINDOW=has_window, DOT_PRECISION=prec,
        **opts,
    )  # fmt: skip

    q_table = _block_table(cu, N, blocks.q_m, queries=True, window=window)
    _bwd_dq_kernel[(Hq * (q_table.shape[0] // 2),)](
        q, k, v, do, lse, delta, dq, cu, q_table,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        do.stride(0), do.stride(1), dq.stride(0), dq.stride(1),
        N, Hq, Hq // Hkv, window or 0, scale * _LOG2E, scale,
        HEAD_DIM=D, BLOCK_M=blocks.q_m, BLOCK_N=blocks.q_n, HAS_WINDOW=has_window, DOT_PRECISION=prec,
        **opts,
    )  # fmt: skip
    return dq, dk, dv


class _VarlenAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, scale, window, blocks):
        out, lse = varlen_attention_forward(q, k, v, cu_seqlens, scale, window, blocks)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
        ctx.scale, ctx.window, ctx.blocks = scale, window, blocks
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
        dq, dk, dv = varlen_attention_backward(do, q, k, v, out, lse, cu_seqlens, ctx.scale, ctx.window, ctx.blocks)
        return dq, dk, dv, None, None, None, None


# ----------------------------------------------------------------------------- host helpers


def _block_table(
    cu: torch.Tensor,  # [S+1] int32
    n_tokens: int,
    block: int,
    *,
    queries: bool,
    window: int | None,
) -> torch.Tensor:
    """``[2 * G]`` int32 ``(sequence, block index)`` pairs, heaviest block first; ``-1`` marks spare entries.

    Built on the device without reading ``cu`` back: ``G = cdiv(N, block) + S`` bounds
    ``sum_s cdiv(len_s, block)``. Work estimate = keys a query block visits (``queries``) or
    queries a key block is visited by, both capped by the window.
    """
    S = cu.numel() - 1
    device = cu.device
    lens = (cu[1:] - cu[:-1]).long()  # [S]
    n_blocks = (lens + block - 1) // block  # [S]
    ends = torch.cumsum(n_blocks, 0)  # [S] exclusive end of each sequence's entries
    G = (n_tokens + block - 1) // block + S
    entry = torch.arange(G, device=device)
    seq = torch.searchsorted(ends, entry, right=True)  # [G] first sequence whose entries end after it
    valid = seq < S
    seq_c = seq.clamp(max=max(S - 1, 0))
    blk = entry - (ends[seq_c] - n_blocks[seq_c])  # [G] block index inside its sequence
    start = blk * block
    seq_len = lens[seq_c]
    cap = n_tokens if window is None else window + block
    if queries:
        work = torch.clamp(torch.minimum(start + block, seq_len), max=cap)
    else:
        work = torch.clamp(seq_len - start, max=cap)
    work = torch.where(valid, work, torch.full_like(work, -1))
    order = torch.argsort(work, descending=True, stable=True)
    table = torch.stack([torch.where(valid, seq, -1), blk], dim=1)[order]  # [G, 2]
    return table.to(torch.int32).reshape(-1).contiguous()


def _check_inputs(q, k, v, cu_seqlens, window) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"q, k, v must be [N, heads, D]; got shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError(f"k and v must be [N, Hkv, D] matching q [N, Hq, D]; got {tuple(k.shape)}, {tuple(v.shape)}, q {tuple(q.shape)}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"query heads {q.shape[1]} must be a multiple of kv heads {k.shape[1]}")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be a 1-D int32/int64 tensor of S+1 >= 2 offsets; got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be None or a positive int; got {window!r}")


def _check_blocks(blocks: VarlenBlocks) -> None:
    for name in ("fwd_m", "fwd_n", "kv_n", "kv_m", "q_m", "q_n"):
        size = getattr(blocks, name)
        if size < 16 or size & (size - 1):
            raise ValueError(f"blocks.{name}={size} must be a power of two >= 16")
    for big, small in (("fwd_m", "fwd_n"), ("kv_n", "kv_m"), ("q_m", "q_n")):
        if getattr(blocks, big) % getattr(blocks, small):
            raise ValueError(f"blocks.{big} must be a multiple of blocks.{small}; got {getattr(blocks, big)}, {getattr(blocks, small)}")


def _require_triton() -> None:
    if triton is None:
        raise RuntimeError("the triton backend of varlen_attention needs triton: pip install triton")


def _flash_attn(q, k, v, cu_seqlens, scale, window, max_seqlen) -> torch.Tensor:
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        raise RuntimeError("backend='flash_attn' needs the flash-attn package: pip install flash-attn") from None
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    if max_seqlen is None:
        max_seqlen = int((cu[1:] - cu[:-1]).max().item())  # a host sync, avoided by passing max_seqlen
    # flash-attn's window counts keys to the left of the query, excluding it.
    window_size = (-1, -1) if window is None else (window - 1, 0)
    return flash_attn_varlen_func(
        q, k, v, cu, cu, max_seqlen, max_seqlen, softmax_scale=scale, causal=True, window_size=window_size
    )


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: plain tf32 (10-bit mantissa) misses the 1e-4 fp32 accuracy target, ieee skips
    # the tensor cores; 3xTF32 keeps both. 16-bit inputs ignore this setting.
    if _interpreting():
        return "interpret"  # see _dot
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _launch_options(blocks: VarlenBlocks) -> dict:
    if _interpreting():
        return {}
    return {"num_warps": blocks.num_warps, "num_stages": blocks.num_stages}


# ----------------------------------------------------------------------------- kernels

if triton is not None:

    @triton.jit
    def _dot(a, b, acc, DOT_PRECISION: tl.constexpr):
        """``a @ b (+ acc)`` in fp32. Triton's CPU interpreter keeps bf16 as raw uint16 bits and
        would multiply those, so there the tiles are widened first (their values are unchanged)."""
        if DOT_PRECISION == "interpret":
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        return tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    @triton.jit
    def _fwd_inner(
        acc, l_i, m_i, q,
        k_base, v_base, stride_kn, stride_vn,
        lo, hi, offs_m, offs_d, seq_len, window, qk_scale,
        BLOCK_N: tl.constexpr, MASKED: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):  # fmt: skip
        """Online-softmax update of ``acc [M, D]``, ``l_i``, ``m_i [M]`` over key rows ``lo..hi``."""
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            key_in = offs_n < seq_len
            k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=key_in[:, None], other=0.0)
            s = _dot(q, tl.trans(k), None, DOT_PRECISION) * qk_scale  # [M, N] log2 units
            if MASKED:
                ok = (offs_n[None, :] <= offs_m[:, None]) & key_in[None, :]
                if HAS_WINDOW:
                    ok = ok & (offs_m[:, None] - offs_n[None, :] < window)
                s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            if MASKED:
                # A row with no visible key yet keeps m = -inf; subtract 0 so exp2 gives 0, not NaN.
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            else:
                m_safe = m_new  # every row sees every key of an unmasked tile
            p = tl.math.exp2(s - m_safe[:, None])
            alpha = tl.math.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=key_in[:, None], other=0.0)
            acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], DOT_PRECISION)
            m_i = m_new
        return acc, l_i, m_i

    @triton.jit
    def _program_block(TABLE, CU, n_heads):
        """This program's (head, sequence, block of the sequence, sequence start, sequence length);
        heads vary fastest so the query heads of one kv group run side by side and share K/V in L2.
        A spare table entry has sequence -1 (its start/length are read from sequence 0, unused)."""
        pid = tl.program_id(0)
        head = pid % n_heads
        entry = pid // n_heads
        seq = tl.load(TABLE + 2 * entry)
        blk = tl.load(TABLE + 2 * entry + 1)
        safe = tl.maximum(seq, 0)
        seq_start = tl.load(CU + safe)
        seq_len = tl.load(CU + safe + 1) - seq_start
        return head, seq, blk, seq_start, seq_len

    @triton.jit
    def _fwd_kernel(
        Q, K, V, O, LSE, CU, TABLE,
        stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_on, stride_oh,
        n_tokens, n_heads, group, window, qk_scale,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        HAS_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):  # fmt: skip
        h, seq, blk, seq_start, seq_len = _program_block(TABLE, CU, n_heads)
        if seq < 0:  # a spare entry of the block table
            return
        hk = h // group
        q_lo = blk * BLOCK_M

        offs_m = q_lo + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        row_in = offs_m < seq_len
        base = seq_start.to(tl.int64)
        q_base = Q + base * stride_qn + h * stride_qh
        k_base = K + base * stride_kn + hk * stride_kh
        v_base = V + base * stride_vn + hk * stride_vh
        q = tl.load(q_base + offs_m[:, None] * stride_qn + offs_d[None, :], mask=row_in[:, None], other=0.0)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        hi = tl.minimum(q_lo + BLOCK_M, seq_len)
        if HAS_WINDOW:
            # Keys left of the first row's window are invisible to the whole block; key blocks
            # starting at or after q_lo + BLOCK_M - window are inside every row's window.
            lo = tl.maximum(q_lo - window + 1, 0) // BLOCK_N * BLOCK_N
            mid = (tl.maximum(q_lo + BLOCK_M - window, 0) + BLOCK_N - 1) // BLOCK_N * BLOCK_N
            mid = tl.minimum(tl.maximum(mid, lo), q_lo)
            acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn,
                                       lo, mid, offs_m, offs_d, seq_len, window, qk_scale,
                                       BLOCK_N, True, True, DOT_PRECISION)  # fmt: skip
        else:
            mid = 0
        # Below the diagonal: every key is visible to every row (rows past seq_len are never stored).
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn,
                                   mid, q_lo, offs_m, offs_d, seq_len, window, qk_scale,
                                   BLOCK_N, False, HAS_WINDOW, DOT_PRECISION)  # fmt: skip
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn,
                                   q_lo, hi, offs_m, offs_d, seq_len, window, qk_scale,
                                   BLOCK_N, True, HAS_WINDOW, DOT_PRECISION)  # fmt: skip

        l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # only rows past seq_len can be empty
        out = acc / l_safe[:, None]
        o_ptrs = O + base * stride_on + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :]
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_in[:, None])
        lse = (m_i + tl.math.log2(l_safe)) * 0.6931471805599453  # natural-log logsumexp
        tl.store(LSE + h.to(tl.int64) * n_tokens + base + offs_m, lse, mask=row_in)

    @triton.jit
    def _bwd_delta_kernel(
        O, DO, DELTA, stride_on, stride_oh, stride_don, stride_doh, n_tokens,
        HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        """``delta[h, n] = sum_d dO[n, h, d] * O[n, h, d]`` (FlashAttention-2 Alg. 2, line 4)."""
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        h = tl.program_id(1)
        offs_d = tl.arange(0, HEAD_DIM)
        row_in = rows < n_tokens
        r64 = rows.to(tl.int64)
        o = tl.load(O + r64[:, None] * stride_on + h * stride_oh + offs_d[None, :], mask=row_in[:, None], other=0.0)
        do = tl.load(DO + r64[:, None] * stride_don + h * stride_doh + offs_d[None, :], mask=row_in[:, None], other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(DELTA + h.to(tl.int64) * n_tokens + rows, delta, mask=row_in)

    @triton.jit
    def _dkdv_inner(
        dk, dv, k, v,
        q_base, do_base, lse_base, delta_base, stride_qn, stride_don,
        lo, hi, offs_n, offs_d, seq_len, window, qk_scale,
        BLOCK_M: tl.constexpr, MASKED: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):  # fmt: skip
        """Add one query head's contributions from query rows ``lo..hi`` to ``dk, dv [N, D]``.

        Works on transposed tiles (keys x queries) so ``dv += P^T dO`` and ``dk += dS^T Q`` are
        plain dots. Rows past seq_len load as zeros and contribute exactly zero without a mask.
        """
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            row_in = offs_m < seq_len
            q = tl.load(q_base + offs_m[:, None] * stride_qn + offs_d[None, :], mask=row_in[:, None], other=0.0)
            do = tl.load(do_base + offs_m[:, None] * stride_don + offs_d[None, :], mask=row_in[:, None], other=0.0)
            lse2 = tl.load(lse_base + offs_m, mask=row_in, other=0.0) * 1.4426950408889634
            delta = tl.load(delta_base + offs_m, mask=row_in, other=0.0)
            s_t = _dot(k, tl.trans(q), None, DOT_PRECISION) * qk_scale  # [N, M]
            p_t = tl.math.exp2(s_t - lse2[None, :])
            if MASKED:
                ok = (offs_m[None, :] >= offs_n[:, None]) & row_in[None, :]
                if HAS_WINDOW:
                    ok = ok & (offs_m[None, :] - offs_n[:, None] < window)
                p_t = tl.where(ok, p_t, 0.0)
            dv = _dot(p_t.to(do.dtype), do, dv, DOT_PRECISION)
            dp_t = _dot(v, tl.trans(do), None, DOT_PRECISION)  # [N, M]
            ds_t = p_t * (dp_t - delta[None, :])
            dk = _dot(ds_t.to(q.dtype), q, dk, DOT_PRECISION)
        return dk, dv

    @triton.jit
    def _bwd_dkdv_kernel(
        Q, K, V, DO, LSE, DELTA, DK, DV, CU, TABLE,
        stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh,
        stride_don, stride_doh, stride_dkn, stride_dkh, stride_dvn, stride_dvh,
        n_tokens, n_kv_heads, group, window, qk_scale, scale,
        HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
        HAS_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):  # fmt: skip
        hk, seq, blk, seq_start, seq_len = _program_block(TABLE, CU, n_kv_heads)
        if seq < 0:  # a spare entry of the block table
            return
        k_lo = blk * BLOCK_N

        offs_n = k_lo + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        key_in = offs_n < seq_len
        base = seq_start.to(tl.int64)
        k = tl.load(K + base * stride_kn + hk * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
                    mask=key_in[:, None], other=0.0)  # fmt: skip
        v = tl.load(V + base * stride_vn + hk * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :],
                    mask=key_in[:, None], other=0.0)  # fmt: skip

        # Query rows that see some key of this block, and the aligned row where the unmasked run ends.
        diag_end = tl.minimum(k_lo + BLOCK_N, seq_len)
        if HAS_WINDOW:
            q_hi = tl.minimum(seq_len, k_lo + BLOCK_N - 1 + window)
            full_end = tl.minimum((k_lo + window) // BLOCK_M * BLOCK_M, (q_hi + BLOCK_M - 1) // BLOCK_M * BLOCK_M)
            full_end = tl.maximum(full_end, k_lo + BLOCK_N)
        else:
            q_hi = seq_len
            full_end = seq_len

        dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        # The query heads of this kv head's GQA group all add into the same dK/dV rows.
        for g in range(0, group):
            h = hk * group + g
            q_base = Q + base * stride_qn + h * stride_qh
            do_base = DO + base * stride_don + h * stride_doh
            lse_base = LSE + h.to(tl.int64) * n_tokens + base
            delta_base = DELTA + h.to(tl.int64) * n_tokens + base
            dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qn, stride_don,
                                 k_lo, diag_end, offs_n, offs_d, seq_len, window, qk_scale,
                                 BLOCK_M, True, HAS_WINDOW, DOT_PRECISION)  # fmt: skip
            dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qn, stride_don,
                                 k_lo + BLOCK_N, full_end, offs_n, offs_d, seq_len, window, qk_scale,
                                 BLOCK_M, False, HAS_WINDOW, DOT_PRECISION)  # fmt: skip
            if HAS_WINDOW:
                dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qn, stride_don,
                                     full_end, q_hi, offs_n, offs_d, seq_len, window, qk_scale,
                                     BLOCK_M, True, True, DOT_PRECISION)  # fmt: skip

        dk_ptrs = DK + base * stride_dkn + hk * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :]
        dv_ptrs = DV + base * stride_dvn + hk * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :]
        tl.store(dk_ptrs, (dk * scale).to(DK.dtype.element_ty), mask=key_in[:, None])
        tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=key_in[:, None])

    @triton.jit
    def _dq_inner(
        dq, q, do, lse2, delta,
        k_base, v_base, stride_kn, stride_vn,
        lo, hi, offs_m, offs_d, seq_len, window, qk_scale,
        BLOCK_N: tl.constexpr, MASKED: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):  # fmt: skip
        """Add ``dS K`` over key rows ``lo..hi`` to ``dq [M, D]`` (scaled by the caller)."""
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            key_in = offs_n < seq_len
            k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=key_in[:, None], other=0.0)
            v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=key_in[:, None], other=0.0)
            s = _dot(q, tl.trans(k), None, DOT_PRECISION) * qk_scale  # [M, N]
            p = tl.math.exp2(s - lse2[:, None])
            if MASKED:
                ok = (offs_n[None, :] <= offs_m[:, None]) & key_in[None, :]
                if HAS_WINDOW:
                    ok = ok & (offs_m[:, None] - offs_n[None, :] < window)
                p = tl.where(ok, p, 0.0)
            dp = _dot(do, tl.trans(v), None, DOT_PRECISION)  # [M, N]
            ds = p * (dp - delta[:, None])
            dq = _dot(ds.to(k.dtype), k, dq, DOT_PRECISION)
        return dq

    @triton.jit
    def _bwd_dq_kernel(
        Q, K, V, DO, LSE, DELTA, DQ, CU, TABLE,
        stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh,
        stride_don, stride_doh, stride_dqn, stride_dqh,
        n_tokens, n_heads, group, window, qk_scale, scale,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        HAS_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):  # fmt: skip
        h, seq, blk, seq_start, seq_len = _program_block(TABLE, CU, n_heads)
        if seq < 0:  # a spare entry of the block table
            return
        hk = h // group
        q_lo = blk * BLOCK_M

        offs_m = q_lo + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        row_in = offs_m < seq_len
        base = seq_start.to(tl.int64)
        q = tl.load(Q + base * stride_qn + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :],
                    mask=row_in[:, None], other=0.0)  # fmt: skip
        do = tl.load(DO + base * stride_don + h * stride_doh + offs_m[:, None] * stride_don + offs_d[None, :],
                     mask=row_in[:, None], other=0.0)  # fmt: skip
        stat = h.to(tl.int64) * n_tokens + base + offs_m
        # Rows past seq_len: q = dO = delta = 0 gives dS = 0, and they are never stored.
        lse2 = tl.load(LSE + stat, mask=row_in, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + stat, mask=row_in, other=0.0)
        k_base = K + base * stride_kn + hk * stride_kh
        v_base = V + base * stride_vn + hk * stride_vh

        dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        hi = tl.minimum(q_lo + BLOCK_M, seq_len)
        if HAS_WINDOW:
            lo = tl.maximum(q_lo - window + 1, 0) // BLOCK_N * BLOCK_N
            mid = (tl.maximum(q_lo + BLOCK_M - window, 0) + BLOCK_N - 1) // BLOCK_N * BLOCK_N
            mid = tl.minimum(tl.maximum(mid, lo), q_lo)
            dq = _dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn,
                           lo, mid, offs_m, offs_d, seq_len, window, qk_scale,
                           BLOCK_N, True, True, DOT_PRECISION)  # fmt: skip
        else:
            mid = 0
        dq = _dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn,
                       mid, q_lo, offs_m, offs_d, seq_len, window, qk_scale,
                       BLOCK_N, False, HAS_WINDOW, DOT_PRECISION)  # fmt: skip
        dq = _dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn,
                       q_lo, hi, offs_m, offs_d, seq_len, window, qk_scale,
                       BLOCK_N, True, HAS_WINDOW, DOT_PRECISION)  # fmt: skip
        dq_ptrs = DQ + base * stride_dqn + h * stride_dqh + offs_m[:, None] * stride_dqn + offs_d[None, :]
        tl.store(dq_ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=row_in[:, None])
