"""Decode attention over a paged KV cache (PagedAttention, arXiv:2309.06180), with optional
split-K over the context (Flash-Decoding, Dao et al. 2023) for long contexts at small batch.

Paged cache layout (per layer; the generation engine's paged cache uses exactly this):

* ``k_pool``, ``v_pool``: ``[num_blocks, block_size, Hkv, D]``. A physical block holds
  ``block_size`` consecutive tokens of one sequence; ``block_size`` is a power of two (e.g. 16).
  Token ``t`` of a block sits at ``pool[block, t]``, all its kv heads side by side, so writing
  one new token is one contiguous ``[Hkv, D]`` store.
* ``block_tables``: ``[B, max_blocks_per_seq]`` int32. ``block_tables[b, j]`` is the physical
  block holding positions ``j * block_size .. (j + 1) * block_size - 1`` of sequence ``b``.
  Entries past the last used block, and entries of blocks wholly before the sliding window,
  are never read and may hold anything (e.g. -1 or 0).
* ``lengths``: ``[B]`` int32, number of valid tokens of each sequence, the new token's k/v
  already written (so the query at position ``lengths[b] - 1`` attends to itself). A length
  of 0 (a padding row) gives an all-zero output. ``lengths[b] <= max_blocks_per_seq * block_size``.
* ``q``: ``[B, Hq, D]``, one new query token per sequence. Grouped-query attention: query head
  ``h`` reads kv head ``h // (Hq // Hkv)``.
* ``window``: optional sliding window; a query attends only to the last ``window`` positions
  ``[lengths[b] - window, lengths[b])`` (Mistral's convention, as in ``attention.decode_attention``).

Kernel grid: one program per ``(sequence, kv head, split)``. A program loads its kv head's whole
query group ``[G, D]`` (``G = Hq // Hkv``, padded to 16 rows for ``tl.dot``) once, then walks its
range of context positions in tiles of ``BLOCK_N`` tokens, gathering each token's row through
the block table, so every K/V byte is read once per kv head rather than once per query head
(decode is memory-bandwidth bound). Scores and the running softmax stay in fp32 (online
softmax, arXiv:2205.14135). With ``num_splits > 1`` the context ``[lo, lengths[b])`` of each
sequence is cut into ``num_splits`` contiguous chunks processed by separate programs, each
writing a normalised partial output and its log-sum-exp; a second kernel merges them
(flash-decoding). That keeps the GPU full when ``B * Hkv`` is smaller than the SM count.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from spmd_rl.kernels.attention import decode_attention

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch reference works without triton
    triton = None

BACKENDS = ("triton", "torch", "sdpa")
_LOG2E = 1.4426950408889634
_H100_SMS = 132  # SM count assumed when no CUDA device is visible (interpreter, CPU)


def paged_decode_attention_reference(
    q: torch.Tensor,  # [B, Hq, D]
    k_pool: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_pool: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    block_tables: torch.Tensor,  # [B, max_blocks_per_seq] physical block of each logical block
    lengths: torch.Tensor,  # [B] valid tokens per sequence
    *,
    scale: float | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Paged decode attention in plain torch -> ``[B, Hq, D]`` (CPU path and test oracle).

    Gathers each sequence's blocks into a contiguous ``[B, Hkv, S, D]`` cache, then runs
    ``attention.decode_attention`` on it; rows with ``lengths[b] == 0`` come out as zeros.
    """
    _check_inputs(q, k_pool, v_pool, block_tables, lengths, window)
    B, block_size = q.shape[0], k_pool.shape[1]
    Hkv, D = k_pool.shape[2], k_pool.shape[3]
    if B == 0:
        return torch.empty_like(q)
    # Only the blocks some sequence uses; unused table entries may be garbage, so clamp them to a
    # real block (the slots they fill lie past lengths[b] and are masked by decode_attention).
    used_blocks = max(1, -(-int(lengths.max()) // block_size))
    table = block_tables[:, :used_blocks].long().clamp(0, k_pool.shape[0] - 1)
    S = used_blocks * block_size
    k = k_pool[table].reshape(B, S, Hkv, D).transpose(1, 2)  # [B, Hkv, S, D]
    v = v_pool[table].reshape(B, S, Hkv, D).transpose(1, 2)
    lengths = lengths.to(q.device)
    out = decode_attention(q, k, v, lengths, scale=scale, window=window)
    # decode_attention's softmax over no keys is NaN; a padding row yields zeros instead.
    return torch.where((lengths > 0).view(B, 1, 1), out, torch.zeros((), dtype=out.dtype, device=out.device))


def paged_decode_attention_sdpa(
    q: torch.Tensor,  # [B, Hq, D]
    k_pool: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_pool: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    block_tables: torch.Tensor,  # [B, max_blocks_per_seq]
    lengths: torch.Tensor,  # [B], every entry >= 1
    *,
    scale: float | None = None,
    window: int | None = None,
    scratch: Callable[[int], tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> torch.Tensor:
    """The engine's CPU path: gather the used blocks, then one fused
    ``scaled_dot_product_attention`` with one query row per head (``enable_gqa``).

    Faster than the reference on CPU (no softmax/masking passes in Python-visible ops), but it
    assumes what the reference does not: every slot of the pool holds finite numbers (a masked
    slot still multiplies its value by 0, so NaN garbage would leak) and no row is empty. The
    engine's pool is zero-initialised and only ever written with the model's keys/values.

    ``scratch(n)`` (e.g. ``KVPool.gather_scratch``), when given, returns key and value buffers
    ``[n, block_size, Hkv, D]`` to gather the ``n = B x used blocks`` blocks into instead of
    fresh tensors; they are free again when this returns."""
    B, Hq, D = q.shape
    block_size, Hkv = k_pool.shape[1], k_pool.shape[2]
    used_blocks = max(1, -(-int(lengths.max()) // block_size))
    table = block_tables[:, :used_blocks].long().clamp(0, k_pool.shape[0] - 1).reshape(-1)  # [B * used_blocks]
    S = used_blocks * block_size
    # index_select over the flat table: the same rows as k_pool[table], a few times faster on CPU.
    k_out, v_out = scratch(table.shape[0]) if scratch is not None else (None, None)
    k = torch.index_select(k_pool, 0, table, out=k_out).view(B, S, Hkv, D).transpose(1, 2)  # [B, Hkv, S, D]
    v = torch.index_select(v_pool, 0, table, out=v_out).view(B, S, Hkv, D).transpose(1, 2)
    slots = torch.arange(S, device=q.device)
    lengths = lengths.to(q.device).long()
    valid = slots[None, :] < lengths[:, None]  # [B, S]
    if window is not None:
        valid &= slots[None, :] >= lengths[:, None] - window
    # One query row per head (GQA maps head h to kv head h // G): torch's CPU flash kernel
    # splits these rows over threads far better than a [G, D] query group per kv head.
    out = torch.nn.functional.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=valid[:, None, None, :],
                                                           scale=scale, enable_gqa=Hq != Hkv)
    return out.reshape(B, Hq, D)


def paged_decode_attention(
    q: torch.Tensor,  # [B, Hq, D]
    k_pool: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_pool: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    block_tables: torch.Tensor,  # [B, max_blocks_per_seq] int32
    lengths: torch.Tensor,  # [B] int32
    *,
    scale: float | None = None,
    window: int | None = None,
    backend: str = "triton",
    num_splits: int | None = None,
    block_n: int | None = None,
    num_warps: int = 4,
    scratch: Callable[[int], tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> torch.Tensor:
    """Attention of one query per sequence over its paged K/V -> ``[B, Hq, D]`` in ``q.dtype``.

    ``backend="torch"`` runs ``paged_decode_attention_reference``; ``"sdpa"`` the faster torch
    path for finite pools (``paged_decode_attention_sdpa``, which gathers into ``scratch``
    buffers when given; the other backends ignore it). ``num_splits`` partitions
    each context for flash-decoding (``None``: ``default_num_splits``); ``block_n`` is the
    number of tokens per tile (power of two >= 16; ``None``: 64).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if backend == "torch":
        return paged_decode_attention_reference(q, k_pool, v_pool, block_tables, lengths, scale=scale, window=window)
    if backend == "sdpa":
        return paged_decode_attention_sdpa(q, k_pool, v_pool, block_tables, lengths, scale=scale, window=window,
                                           scratch=scratch)
    if triton is None:
        raise RuntimeError("paged_decode_attention(backend='triton') needs Triton: pip install triton")
    _check_inputs(q, k_pool, v_pool, block_tables, lengths, window)
    B, Hq, D = q.shape
    _, block_size, Hkv, _ = k_pool.shape
    G = Hq // Hkv
    max_context = block_tables.shape[1] * block_size
    if num_splits is None:
        num_splits = default_num_splits(B, Hkv, max_context, num_sms=_sm_count(q.device))
    if not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(f"num_splits must be an int >= 1 (or None for the default); got {num_splits!r}")
    block_n = 64 if block_n is None else block_n
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two >= 16 (16, 32, 64, 128, ...); got {block_n}")
    out = torch.empty((B, Hq, D), dtype=q.dtype, device=q.device)
    if B == 0:
        return out
    scale = D**-0.5 if scale is None else float(scale)
    block_g = max(16, triton.next_power_of_2(G))  # tl.dot needs >= 16 rows
    block_d = max(16, triton.next_power_of_2(D))
    # Triton's CPU interpreter multiplies bf16 dot operands as their raw uint16 bits, so there
    # (CPU tensors only ever run interpreted) the operands go through tl.dot as fp32: bf16
    # products are exact in fp32, so the result matches a bf16 tensor-core dot with fp32 acc.
    upcast = q.device.type == "cpu" and q.dtype == torch.bfloat16
    # fp32 operands: full-precision products (tl.dot would otherwise round them to tf32).
    precision = "ieee" if k_pool.dtype == torch.float32 or upcast else "tf32"
    if num_splits == 1:
        o_part, lse_part = out, out  # lse_part unused when SPLIT is False
        stride_o = (out.stride(0), out.stride(1), 0, out.stride(2))
        stride_lse = (0, 0, 0)
    else:
        o_part = torch.empty((B, Hq, num_splits, D), dtype=torch.float32, device=q.device)
        lse_part = torch.empty((B, Hq, num_splits), dtype=torch.float32, device=q.device)
        stride_o, stride_lse = o_part.stride(), lse_part.stride()
    _paged_decode_kernel[(B, Hkv, num_splits)](
        q, k_pool, v_pool, block_tables, lengths, o_part, lse_part,
        scale * _LOG2E, 0 if window is None else int(window),
        *q.stride(), *k_pool.stride(), *v_pool.stride(), block_tables.stride(0),
        *stride_o, *stride_lse,
        G=G, HEAD_DIM=D, BLOCK_SIZE=block_size, NUM_SPLITS=num_splits,
        BLOCK_G=block_g, BLOCK_D=block_d, BLOCK_N=block_n,
        SPLIT=num_splits > 1, PRECISION=precision, UPCAST=upcast, num_warps=num_warps,
    )  # fmt: skip
    if num_splits > 1:
        _merge_splits_kernel[(B, Hq)](
            o_part, lse_part, out,
            *o_part.stride(), *lse_part.stride(), *out.stride(),
            NUM_SPLITS=num_splits, HEAD_DIM=D,
            BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=block_d, num_warps=num_warps,
        )  # fmt: skip
    return out


def default_num_splits(
    batch: int,
    num_kv_heads: int,
    max_context: int,
    *,
    num_sms: int = _H100_SMS,
    min_split_tokens: int = 256,
    max_splits: int = 32,
) -> int:
    """Context partitions per sequence: enough programs for two per SM, never a split shorter
    than ``min_split_tokens`` (below that, the merge costs more than the parallelism gains).

    ``max_context`` is an upper bound on the context (``max_blocks_per_seq * block_size``),
    known without reading ``lengths`` back from the device.
    """
    programs = batch * num_kv_heads
    if programs >= 2 * num_sms:
        return 1
    wanted = -(-2 * num_sms // max(programs, 1))
    by_length = max_context // min_split_tokens
    return max(1, min(wanted, by_length, max_splits))


def bandwidth_bytes(
    q: torch.Tensor,  # [B, Hq, D]
    k_pool: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_pool: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    block_tables: torch.Tensor,  # [B, max_blocks_per_seq]
    lengths: torch.Tensor,  # [B]
    *,
    window: int | None = None,
) -> int:
    """Least bytes one ``paged_decode_attention`` call must move: the K and V rows of every
    attended token (``min(lengths[b], window)`` per sequence, all kv heads), q read once and the
    output written once (``q.dtype``). Block-table and length reads (a few bytes per block) are
    left out. Divide by the measured time and the HBM bandwidth for the % of the bound."""
    del block_tables  # same signature as the kernel; the table's bytes are negligible
    attended = lengths.long().clamp(min=0)
    if window is not None:
        attended = attended.clamp(max=window)
    tokens = int(attended.sum())
    Hkv, D = k_pool.shape[2], k_pool.shape[3]
    kv = tokens * Hkv * D * (k_pool.element_size() + v_pool.element_size())
    return kv + 2 * q.numel() * q.element_size()


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _H100_SMS


def _check_inputs(q, k_pool, v_pool, block_tables, lengths, window) -> None:
    """Shape/dtype checks that need no device sync (the values of lengths/tables are trusted)."""
    if q.dim() != 3:
        raise ValueError(f"q must be [B, Hq, D]; got shape {tuple(q.shape)}")
    if k_pool.dim() != 4 or k_pool.shape != v_pool.shape:
        raise ValueError(
            "k_pool and v_pool must both be [num_blocks, block_size, Hkv, D]; "
            f"got {tuple(k_pool.shape)} and {tuple(v_pool.shape)}"
        )
    B, Hq, D = q.shape
    _, block_size, Hkv, Dk = k_pool.shape
    if not (q.dtype == k_pool.dtype == v_pool.dtype):
        raise ValueError(f"q, k_pool and v_pool must share one dtype; got {q.dtype}, {k_pool.dtype}, {v_pool.dtype}")
    if Dk != D:
        raise ValueError(f"head dim of q ({D}) and of the pools ({Dk}) must match")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of kv heads ({Hkv})")
    if block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two (1, 2, 4, 8, 16, ...); got {block_size}")
    if block_tables.dim() != 2 or block_tables.shape[0] != B:
        raise ValueError(f"block_tables must be [B={B}, max_blocks_per_seq]; got shape {tuple(block_tables.shape)}")
    if lengths.shape != (B,):
        raise ValueError(f"lengths must be [B={B}]; got shape {tuple(lengths.shape)}")
    for name, t in (("block_tables", block_tables), ("lengths", lengths)):
        if t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be int32 or int64; got {t.dtype}")
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be None or an int >= 1; got {window!r}")


if triton is not None:

    @triton.jit
    def _paged_decode_kernel(
        q_ptr, k_ptr, v_ptr, table_ptr, len_ptr, o_ptr, lse_ptr,
        qk_scale, window,
        stride_qb, stride_qh, stride_qd,
        stride_kb, stride_kt, stride_kh, stride_kd,
        stride_vb, stride_vt, stride_vh, stride_vd,
        stride_table,
        stride_ob, stride_oh, stride_os, stride_od,
        stride_lb, stride_lh, stride_ls,
        G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, NUM_SPLITS: tl.constexpr,
        BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
        SPLIT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ):  # fmt: skip
        """One (sequence, kv head, split): online softmax of the query group over a context chunk."""
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)

        length = tl.load(len_ptr + b).to(tl.int32)
        lo = tl.where(window > 0, tl.maximum(length - window, 0), 0)  # window 0 means none
        # Chunks rounded up to whole tiles, so only the last tile of a chunk is partial.
        chunk = tl.cdiv(tl.cdiv(length - lo, NUM_SPLITS), BLOCK_N) * BLOCK_N
        start = lo + split * chunk
        end = tl.minimum(start + chunk, length)

        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        g_ok = offs_g < G
        d_ok = offs_d < HEAD_DIM
        heads = kvh * G + offs_g
        q_off = b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd
        q = tl.load(q_ptr + q_off, mask=g_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_G, BLOCK_D]
        if UPCAST:
            q = q.to(tl.float32)

        m = tl.full([BLOCK_G], float("-inf"), tl.float32)  # running max of log2-scaled scores
        l = tl.zeros([BLOCK_G], tl.float32)  # running sum of exp2(score - m)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        table_row = table_ptr + b.to(tl.int64) * stride_table
        for tile in range(start, end, BLOCK_N):
            pos = tile + offs_n
            n_ok = pos < end
            # Per-token gather through the block table: a tile may straddle pages, and masked
            # tokens never read their (possibly garbage) table entry.
            block = tl.load(table_row + pos // BLOCK_SIZE, mask=n_ok, other=0).to(tl.int64)
            slot = pos % BLOCK_SIZE
            kv_mask = n_ok[:, None] & d_ok[None, :]
            k_off = block[:, None] * stride_kb + slot[:, None] * stride_kt + kvh * stride_kh
            k_off += offs_d[None, :] * stride_kd
            k = tl.load(k_ptr + k_off, mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
            if UPCAST:
                k = k.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BLOCK_G, BLOCK_N]
            s = tl.where(n_ok[None, :], s, float("-inf"))
            # Every tile holds >= 1 valid token, so m_new is finite and alpha never sees -inf - -inf.
            m_new = tl.maximum(m, tl.max(s, 1))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(s - m_new[:, None])
            l = l * alpha + tl.sum(p, 1)
            v_off = block[:, None] * stride_vb + slot[:, None] * stride_vt + kvh * stride_vh
            v_off += offs_d[None, :] * stride_vd
            v = tl.load(v_ptr + v_off, mask=kv_mask, other=0.0)
            p_v = p.to(v_ptr.dtype.element_ty)  # probabilities rounded to the V dtype, as on tensor cores
            if UPCAST:
                v = v.to(tl.float32)
                p_v = p_v.to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p_v, v, input_precision=PRECISION)
            m = m_new

        # An empty chunk (short sequence, or a padding row) has l == 0: output 0, lse -inf.
        o = acc / tl.where(l > 0, l, 1.0)[:, None]
        o_off = b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + split * stride_os
        o_off += offs_d[None, :] * stride_od
        o_mask = g_ok[:, None] & d_ok[None, :]
        if SPLIT:
            tl.store(o_ptr + o_off, o, mask=o_mask)
            # log2-sum-exp2 of this chunk's scores; -inf for an empty chunk (log2 of 0 avoided).
            lse = tl.where(l > 0, m + tl.log2(tl.where(l > 0, l, 1.0)), float("-inf"))
            lse_off = b.to(tl.int64) * stride_lb + heads * stride_lh + split * stride_ls
            tl.store(lse_ptr + lse_off, lse, mask=g_ok)
        else:
            tl.store(o_ptr + o_off, o.to(o_ptr.dtype.element_ty), mask=o_mask)

    @triton.jit
    def _merge_splits_kernel(
        o_part_ptr, lse_ptr, out_ptr,
        stride_pb, stride_ph, stride_ps, stride_pd,
        stride_lb, stride_lh, stride_ls,
        stride_ob, stride_oh, stride_od,
        NUM_SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """One (sequence, query head): weight each chunk's output by exp2(lse_s - max lse)."""
        b = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        offs_s = tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, BLOCK_D)
        s_ok = offs_s < NUM_SPLITS
        lse = tl.load(lse_ptr + b * stride_lb + h * stride_lh + offs_s * stride_ls, mask=s_ok, other=float("-inf"))
        top = tl.max(lse, 0)
        top = tl.where(top == float("-inf"), 0.0, top)  # all chunks empty: every weight is 0
        w = tl.exp2(lse - top)  # [BLOCK_S]
        o_off = b * stride_pb + h * stride_ph + offs_s[:, None] * stride_ps + offs_d[None, :] * stride_pd
        o = tl.load(o_part_ptr + o_off, mask=s_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
        total = tl.sum(w, 0)
        res = tl.sum(o * w[:, None], 0) / tl.where(total > 0, total, 1.0)
        tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d * stride_od, res.to(out_ptr.dtype.element_ty),
                 mask=offs_d < HEAD_DIM)  # fmt: skip
