"""Per-token logprob (and entropy) of target ids from hidden states and the lm-head weight.

Two implementations of the same math:

* ``logprobs_from_hidden`` (torch): the CPU path and the oracle for the fused kernel. It is
  chunked over tokens so the ``[N, V]`` logits never exist in full at once in the forward; the
  trainer and the generation engine both call it, so their logprobs come from the same math.
* ``fused_logprobs`` (Triton): lm-head matmul, online log-sum-exp (arXiv:1805.02867) and the
  target gather in one kernel that never writes logits to memory, with a backward that
  recomputes the logits tile by tile (the idea of Cut Cross-Entropy, arXiv:2411.09009).

Both accept a vocab shard of a tensor-parallel lm-head (``weight`` holds rows
``[vocab_start, vocab_start + V_local)`` of the full ``[V, H]`` matrix, ``tp_group`` the ranks
holding the other shards), combined as Megatron-LM's vocab-parallel cross-entropy does
(arXiv:1909.08053): all-reduce the max, then the rescaled sums. Under tensor parallelism the
hidden states and the loss are replicated over ``tp_group``; each rank gets the gradient of its
own weight shard and the full (all-reduced) gradient of ``hidden``.

Notation (per token): ``l = hidden @ W.T / T`` the logits, ``logZ = logsumexp(l)``,
``p = softmax(l)``, ``logprob = l[target] - logZ``, ``entropy = logZ - sum_j p_j l_j``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch reference works without Triton
    triton = None
    tl = None

BACKENDS = ("torch", "triton")


# ---------------------------------------------------------------------------------------------
# torch reference
# ---------------------------------------------------------------------------------------------


def logprobs_from_hidden(
    hidden: torch.Tensor,  # [N, H]
    weight: torch.Tensor,  # [V, H] lm-head weight (or its vocab shard [V_local, H])
    targets: torch.Tensor,  # [N] token ids (global ids when sharded)
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_size: int = 4096,
    vocab_start: int = 0,
    tp_group: dist.ProcessGroup | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return ``(logprobs [N], entropy [N] or None)`` of ``targets`` under
    ``softmax(hidden @ weight.T / temperature)``, computed in fp32 (fp64 for fp64 inputs).

    With ``tp_group``, ``weight`` is the vocab shard starting at ``vocab_start`` and the result is
    that of the full vocabulary, identical on every rank of the group.
    """
    _check_inputs(hidden, weight, targets, temperature, vocab_start, tp_group)
    if tp_group is not None:
        return _sharded_reference(hidden, weight, targets, temperature, with_entropy, chunk_size,
                                  vocab_start, tp_group)
    compute_dtype = _compute_dtype(hidden)
    logprobs, entropies = [], []
    for start in range(0, hidden.shape[0], chunk_size):
        h = hidden[start : start + chunk_size]
        logits = (h @ weight.t()).to(compute_dtype)  # [n, V]
        if temperature != 1.0:
            logits = logits / temperature
        lp, ent = logprobs_from_logits(logits, targets[start : start + chunk_size], with_entropy)
        logprobs.append(lp)
        entropies.append(ent)
    logprobs_all = torch.cat(logprobs) if logprobs else hidden.new_zeros(0, dtype=compute_dtype)
    if not with_entropy:
        return logprobs_all, None
    entropy_all = torch.cat(entropies) if entropies else hidden.new_zeros(0, dtype=compute_dtype)
    return logprobs_all, entropy_all


def logprobs_from_logits(
    logits: torch.Tensor,  # [N, V] fp32, already divided by the temperature
    targets: torch.Tensor,  # [N]
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logprob of ``targets`` (and the entropy) from logits: ``log_softmax`` then gather."""
    log_z = torch.logsumexp(logits, dim=-1)  # [N]
    target_logits = logits.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    logprobs = target_logits - log_z
    if not with_entropy:
        return logprobs, None
    probs = torch.softmax(logits, dim=-1)
    entropy = log_z - (probs * logits).sum(-1)  # H = logZ - E_p[logit]
    return logprobs, entropy


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    # fp32 for fp32/bf16/fp16 inputs; fp64 inputs stay fp64 so the reference can be a float64 oracle.
    return torch.float64 if hidden.dtype == torch.float64 else torch.float32


class _CopyToTensorParallel(torch.autograd.Function):
    """Identity forward, all-reduce SUM backward (Megatron's ``f``, arXiv:1909.08053)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # A functional collective, as DTensor's own (whose async ones may be in flight on the group)
        summed = funcol.all_reduce(grad.contiguous(), "sum", ctx.group)
        return funcol.wait_tensor(summed), None


def copy_to_tensor_parallel(x: torch.Tensor, group) -> torch.Tensor:
    """``x`` unchanged; its gradient summed over ``group`` in the backward. For a replicated
    tensor that meets only this rank's share of the work (each vocab shard here; per-head norm
    weights, MoE routing weights and expert inputs in the decoder), whose gradient on each rank
    is a partial sum."""
    return _CopyToTensorParallel.apply(x, group)


class _ReduceFromTensorParallel(torch.autograd.Function):
    """All-reduce SUM forward, identity backward: the summed statistics and everything after
    them are replicated over the group, so each rank's upstream gradient is already the whole
    one (Megatron's ``g``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        # Functional, so a compiled decoder block traces it (the row-parallel projections)
        return funcol.wait_tensor(funcol.all_reduce(x.contiguous(), "sum", group))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def reduce_from_tensor_parallel(x: torch.Tensor, group) -> torch.Tensor:
    """``x`` summed over ``group``; the gradient passes through unchanged. For the partial
    sums of a row-parallel projection or of vocab shards' statistics."""
    return _ReduceFromTensorParallel.apply(x, group)


def _sharded_reference(hidden, weight, targets, temperature, with_entropy, chunk_size,
                       vocab_start, tp_group):
    """Vocab-parallel form of ``logprobs_from_hidden``: local max/sums, then all-reduces."""
    compute_dtype = _compute_dtype(hidden)
    v_local = weight.shape[0]
    hidden = copy_to_tensor_parallel(hidden, tp_group)  # it feeds every vocab shard
    logprobs, entropies, owned_counts = [], [], []
    for start in range(0, hidden.shape[0], chunk_size):
        logits = (hidden[start : start + chunk_size] @ weight.t()).to(compute_dtype) / temperature
        local = targets[start : start + chunk_size].long() - vocab_start  # [n]
        owned = (local >= 0) & (local < v_local)
        # The max is only a shift for stability: any per-token constant gives the same values and
        # gradients, so it is taken without gradient.
        global_max = logits.detach().amax(-1)
        dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=tp_group)
        shifted = logits - global_max[:, None]  # [n, V_local] <= 0
        exps = shifted.exp()
        target_logit = logits.gather(-1, local.clamp(0, v_local - 1)[:, None]).squeeze(-1)
        stats = [exps.sum(-1), torch.where(owned, target_logit, torch.zeros_like(target_logit))]
        if with_entropy:
            stats.append((exps * shifted).sum(-1))  # sum_j exp(l_j - M) (l_j - M)
        stats = reduce_from_tensor_parallel(torch.stack(stats), tp_group)
        sum_exp = stats[0]
        logprobs.append(stats[1] - (global_max + sum_exp.log()))
        if with_entropy:
            # H = logZ - E_p[l] = (M + log S) - (M + W / S)
            entropies.append(sum_exp.log() - stats[2] / sum_exp)
        owned_counts.append(owned.to(torch.int64))
    if owned_counts:
        _check_owned_once(torch.cat(owned_counts), tp_group)
    empty = hidden.new_zeros(0, dtype=compute_dtype)
    logprobs_all = torch.cat(logprobs) if logprobs else empty
    if not with_entropy:
        return logprobs_all, None
    return logprobs_all, torch.cat(entropies) if entropies else empty


def _check_owned_once(owned: torch.Tensor, tp_group) -> None:
    """Every target must lie in exactly one rank's shard, i.e. be a valid global token id."""
    count = owned.to(torch.int64)
    dist.all_reduce(count, group=tp_group)
    if not bool((count == 1).all()):
        raise ValueError("targets must be token ids in [0, vocab_size) of the full (all shards) "
                         "vocabulary; some lie in no rank's vocab shard")


def _check_inputs(hidden, weight, targets, temperature, vocab_start, tp_group) -> None:
    """One-line ValueErrors for shapes and arguments; no device synchronisation."""
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"hidden must be [N, H] and weight [V, H]; got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden size mismatch: hidden is {tuple(hidden.shape)}, weight is "
                         f"{tuple(weight.shape)}; both need the same last dim H")
    if weight.shape[0] < 1:
        raise ValueError("weight must hold at least one vocab row; got an empty [0, H] shard")
    if targets.dim() != 1 or targets.shape[0] != hidden.shape[0]:
        raise ValueError(f"targets must be [N] with N = {hidden.shape[0]} (rows of hidden); "
                         f"got {tuple(targets.shape)}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"targets must be integer token ids; got dtype {targets.dtype}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    if tp_group is None and vocab_start != 0:
        raise ValueError(f"vocab_start={vocab_start} needs a tp_group (a vocab shard without the "
                         "other shards' ranks); use vocab_start=0 or pass tp_group")
    if vocab_start < 0:
        raise ValueError(f"vocab_start must be >= 0; got {vocab_start}")


def logprobs_and_entropy(
    hidden: torch.Tensor,  # [N, H]
    weight: torch.Tensor,  # [V, H] or a vocab shard [V_local, H]
    targets: torch.Tensor,  # [N]
    *,
    backend: str,
    temperature: float = 1.0,
    with_entropy: bool = False,
    vocab_start: int = 0,
    tp_group: dist.ProcessGroup | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(logprobs [N], entropy [N] or None)`` with the chosen ``backend`` ("torch" or "triton")."""
    if backend == "torch":
        return logprobs_from_hidden(hidden, weight, targets, temperature=temperature,
                                    with_entropy=with_entropy, vocab_start=vocab_start,
                                    tp_group=tp_group)
    if backend == "triton":
        return fused_logprobs(hidden, weight, targets, temperature=temperature,
                              with_entropy=with_entropy, vocab_start=vocab_start,
                              tp_group=tp_group)
    raise ValueError(f"unknown logprob backend {backend!r}; valid choices: {', '.join(BACKENDS)}")


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _logits_tile(h_ptr, w_ptr, rows, cols, row_mask, col_mask, H, stride_hn, stride_hk,
                     stride_wv, stride_wk, inv_t, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                     BLOCK_H: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
        """``hidden[rows] @ weight[cols].T / T`` as a ``[BLOCK_N, BLOCK_V]`` fp32 tile."""
        # int64 offsets: V * H exceeds 2**31 for large vocabularies.
        h_rows = h_ptr + rows.to(tl.int64)[:, None] * stride_hn  # [BN, 1]
        w_cols = w_ptr + cols.to(tl.int64)[None, :] * stride_wv  # [1, BV]
        acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
        for k0 in range(0, H, BLOCK_H):
            ks = k0 + tl.arange(0, BLOCK_H)
            k_mask = ks < H
            a = tl.load(h_rows + ks[None, :] * stride_hk, mask=row_mask[:, None] & k_mask[None, :],
                        other=0.0)  # [BN, BH]
            b = tl.load(w_cols + ks[:, None] * stride_wk, mask=k_mask[:, None] & col_mask[None, :],
                        other=0.0)  # [BH, BV], W tile read transposed
            if UPCAST:
                # The interpreter multiplies bf16 as raw uint16 bits; fp32 products of bf16
                # values are exact, so this matches the tensor-core result.
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PREC)
        return acc * inv_t

    @triton.jit
    def _fwd_kernel(h_ptr, w_ptr, tgt_ptr, out_m_ptr, out_s_ptr, out_w_ptr, out_t_ptr,
                    N, V, H, stride_hn, stride_hk, stride_wv, stride_wk, inv_t, vocab_start,
                    v_per_split, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                    BLOCK_H: tl.constexpr, WITH_ENT: tl.constexpr, UPCAST: tl.constexpr,
                    PREC: tl.constexpr):
        """Online-softmax partials of one token block over one vocab range.

        Program ``(i, j)`` covers rows ``[i*BLOCK_N, (i+1)*BLOCK_N)`` and local vocab columns
        ``[j*v_per_split, (j+1)*v_per_split)``, and writes per row: the max ``m``, ``s = sum
        exp(l - m)``, ``w = sum exp(l - m) (l - m)`` (only WITH_ENT) and the target logit when the
        target falls in the range (else 0), each at ``out[j, row]``.
        """
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        tgt = tl.load(tgt_ptr + rows, mask=row_mask, other=-1).to(tl.int64) - vocab_start
        m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
        s = tl.zeros((BLOCK_N,), tl.float32)
        w = tl.zeros((BLOCK_N,), tl.float32)
        t = tl.zeros((BLOCK_N,), tl.float32)
        v_begin = pid_s * v_per_split
        v_end = tl.minimum(v_begin + v_per_split, V)
        for v0 in range(v_begin, v_end, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            col_mask = cols < v_end
            logits = _logits_tile(h_ptr, w_ptr, rows, cols, row_mask, col_mask, H, stride_hn,
                                  stride_hk, stride_wv, stride_wk, inv_t, BLOCK_N, BLOCK_V,
                                  BLOCK_H, UPCAST, PREC)
            logits = tl.where(col_mask[None, :], logits, float("-inf"))
            m_new = tl.maximum(m, tl.max(logits, axis=1))  # finite: every tile has a valid col
            alpha = tl.exp(m - m_new)  # 0 on the first tile (m = -inf)
            e = tl.exp(logits - m_new[:, None])  # 0 on padded cols
            if WITH_ENT:
                # Keep the sum shifted by the running max (sum e*(l - m), not sum e*l): the entropy
                # is then a difference of O(1) terms instead of two large logits-sized ones.
                d = tl.where(col_mask[None, :], logits - m_new[:, None], 0.0)
                # Re-centre the old sum on m_new; the where avoids 0 * -inf on the first tile.
                shift = tl.where(s > 0, m - m_new, 0.0)
                w = alpha * (w + s * shift) + tl.sum(e * d, axis=1)
            s = alpha * s + tl.sum(e, axis=1)
            m = m_new
            hit = (cols[None, :] == tgt[:, None]) & col_mask[None, :]
            t += tl.sum(tl.where(hit, logits, 0.0), axis=1)
        out = pid_s.to(tl.int64) * N + rows
        tl.store(out_m_ptr + out, m, mask=row_mask)
        tl.store(out_s_ptr + out, s, mask=row_mask)
        tl.store(out_t_ptr + out, t, mask=row_mask)
        if WITH_ENT:
            tl.store(out_w_ptr + out, w, mask=row_mask)

    @triton.jit
    def _bwd_kernel(h_ptr, w_ptr, tgt_ptr, logz_ptr, mean_ptr, g_lp_ptr, g_ent_ptr, dl_ptr,
                    N, H, stride_hn, stride_hk, stride_wv, stride_wk, stride_dn, inv_t,
                    vocab_start, v_begin, v_end, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                    BLOCK_H: tl.constexpr, WITH_ENT: tl.constexpr, UPCAST: tl.constexpr,
                    PREC: tl.constexpr):
        """Gradient w.r.t. the un-tempered logits ``hidden @ W.T`` of one ``[BLOCK_N, BLOCK_V]``
        tile of the vocab chunk ``[v_begin, v_end)``, written to ``dl[:, col - v_begin]``.

        ``d lp / d l_j = 1[j = target] - p_j``, ``d H / d l_j = -p_j (l_j - E_p[l])`` and
        ``l = z / T`` gives the extra ``1 / T``.
        """
        pid_n = tl.program_id(0)
        pid_v = tl.program_id(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        cols = v_begin + pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        col_mask = cols < v_end
        logits = _logits_tile(h_ptr, w_ptr, rows, cols, row_mask, col_mask, H, stride_hn,
                              stride_hk, stride_wv, stride_wk, inv_t, BLOCK_N, BLOCK_V, BLOCK_H,
                              UPCAST, PREC)
        tgt = tl.load(tgt_ptr + rows, mask=row_mask, other=-1).to(tl.int64) - vocab_start
        log_z = tl.load(logz_ptr + rows, mask=row_mask, other=0.0)
        g_lp = tl.load(g_lp_ptr + rows, mask=row_mask, other=0.0)
        p = tl.exp(logits - log_z[:, None])  # global softmax (logZ over all shards)
        onehot = tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0)
        grad = g_lp[:, None] * (onehot - p)
        if WITH_ENT:
            mean = tl.load(mean_ptr + rows, mask=row_mask, other=0.0)
            g_ent = tl.load(g_ent_ptr + rows, mask=row_mask, other=0.0)
            grad -= g_ent[:, None] * p * (logits - mean[:, None])
        grad = grad * inv_t
        out = dl_ptr + rows.to(tl.int64)[:, None] * stride_dn + (cols - v_begin)[None, :]
        tl.store(out, grad.to(dl_ptr.dtype.element_ty),
                 mask=row_mask[:, None] & col_mask[None, :])

    _INTERPRET = bool(triton.knobs.runtime.interpret)  # fixed when the kernels were decorated
else:
    _INTERPRET = False


# ---------------------------------------------------------------------------------------------
# launchers and the autograd Function
# ---------------------------------------------------------------------------------------------

# The backward materialises the logits gradient for one vocab chunk of at most this many
# elements (N * chunk), then hands the two matmuls to cuBLAS; see _FusedLogprobs.backward.
_BWD_CHUNK_ELEMS = 1 << 28


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _launch_config(hidden, block_n, block_v, block_h) -> dict:
    """Block sizes (explicit ones win) and the dot precision/warps for this device and dtype."""
    for name, value in (("block_n", block_n), ("block_v", block_v), ("block_h", block_h)):
        if value is not None and (value < 16 or value & (value - 1)):
            raise ValueError(f"{name} must be a power of two >= 16 (tl.dot tiles); got {value}")
    on_gpu = hidden.is_cuda and not _INTERPRET
    if on_gpu:
        # 128x128 fp32 accumulator over 8 warps; K step 64 (bf16) / 32 (fp32) keeps 3 pipeline
        # stages of both operand tiles within H100 shared memory.
        default = (128, 128, 64 if hidden.element_size() <= 2 else 32)
    else:
        # The interpreter runs each program in numpy: fewer, larger tiles are faster.
        default = (32, 128, 64)
    return dict(
        block_n=block_n or default[0], block_v=block_v or default[1], block_h=block_h or default[2],
        # fp32 inputs: 3xTF32 keeps ~fp32 accuracy on tensor cores; bf16 is exact in fp32 acc.
        prec="tf32x3" if (on_gpu and hidden.dtype == torch.float32) else "tf32" if on_gpu else "ieee",
        upcast=_INTERPRET and hidden.dtype != torch.float32,
        num_warps=8, num_stages=3,
        programs=4 * torch.cuda.get_device_properties(hidden.device).multi_processor_count
        if on_gpu else 4,
    )


def _forward_stats(hidden, weight, targets, inv_t, with_entropy, vocab_start, cfg):
    """Local (this shard) per-token ``m, s, w, target_logit`` ``[N]`` each, fp32."""
    n, h = hidden.shape
    v = weight.shape[0]
    bn, bv = cfg["block_n"], cfg["block_v"]
    n_blocks, v_blocks = _cdiv(n, bn), _cdiv(v, bv)
    # Split the vocab across programs too so that a short batch still fills the GPU; every split
    # gets at least one vocab block, so no partial is empty.
    per_split = _cdiv(v_blocks, max(1, min(v_blocks, _cdiv(cfg["programs"], n_blocks))))
    splits = _cdiv(v_blocks, per_split)
    parts = torch.empty(4, splits, n, dtype=torch.float32, device=hidden.device)
    if not with_entropy:
        parts[2].zero_()
    _fwd_kernel[(n_blocks, splits)](
        hidden, weight, targets, parts[0], parts[1], parts[2], parts[3],
        n, v, h, hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        inv_t, vocab_start, per_split * bv,
        BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=cfg["block_h"], WITH_ENT=with_entropy,
        UPCAST=cfg["upcast"], PREC=cfg["prec"], num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    m, s, w = _merge_partials(parts[0], parts[1], parts[2])
    return m, s, w, parts[3].sum(0)


def _merge_partials(m, s, w):
    """Combine ``[P, N]`` online-softmax partials over P: one max, rescaled sums."""
    m_all = m.amax(0)
    shift = torch.where(s > 0, m - m_all, torch.zeros_like(m))  # <= 0; 0 where a part is empty
    scale = torch.where(s > 0, shift.exp(), torch.zeros_like(s))
    return m_all, (s * scale).sum(0), ((w + s * shift) * scale).sum(0)


def _merge_across_ranks(m, s, w, target_logit, owned, group):
    """All-reduce the per-rank stats of the vocab shards: MAX of ``m``, then one SUM of the
    rescaled ``s``, ``w``, the target logit (non-owners hold 0) and the owner count."""
    m_all = m.clone()
    dist.all_reduce(m_all, op=dist.ReduceOp.MAX, group=group)
    shift = m - m_all
    scale = shift.exp()
    stats = torch.stack([s * scale, (w + s * shift) * scale, target_logit, owned.float()])
    dist.all_reduce(stats, group=group)
    return m_all, stats[0], stats[1], stats[2], stats[3]


class _FusedLogprobs(torch.autograd.Function):
    """Autograd wrapper of the fused kernels; outputs ``logprobs`` (and ``entropy``)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, with_entropy, vocab_start, tp_group,
                cfg):
        n = hidden.shape[0]
        v_local = weight.shape[0]
        inv_t = 1.0 / temperature
        local = targets - vocab_start
        owned = (local >= 0) & (local < v_local)
        if n == 0:
            m = s = w = tgt_logit = hidden.new_zeros(0, dtype=torch.float32)
        else:
            m, s, w, tgt_logit = _forward_stats(hidden, weight, targets, inv_t, with_entropy,
                                                vocab_start, cfg)
        if tp_group is not None:
            m, s, w, tgt_logit, count = _merge_across_ranks(m, s, w, tgt_logit, owned, tp_group)
        else:
            count = owned.float()
        # One host sync: an out-of-range id would otherwise give a silent logprob of -logZ.
        if n and not bool((count == 1).all()):
            raise ValueError("targets must be token ids in [0, vocab_size) of the full vocabulary"
                             f" ({v_local} rows here, vocab_start={vocab_start}); some are outside")
        log_s = s.log()
        log_z = m + log_s
        logprobs = tgt_logit - log_z
        ctx.save_for_backward(hidden, weight, targets, log_z, m + w / s)
        ctx.meta = (inv_t, with_entropy, vocab_start, tp_group, cfg)
        if not with_entropy:
            return logprobs
        return logprobs, log_s - w / s  # H = logZ - E_p[l] = log S - W / S (shifted by m)

    @staticmethod
    def backward(ctx, g_lp, g_ent=None):
        """Recompute logits tile by tile; dHidden = dL @ W / T, dW = dL^T @ hidden / T.

        Design for H100: a Triton kernel over ``(token block, vocab block)`` tiles recomputes the
        logits (one full-H dot per tile, the only extra work vs. a materialised forward) and
        writes ``dL / T`` for one vocab chunk ``[N, C]`` (bf16 for bf16 inputs); the two
        products ``dHidden += dL_c @ W_c`` and ``dW_c = dL_c^T @ hidden`` are dense GEMMs left to
        cuBLAS. Fusing them into the tile kernel would need an ``[BLOCK, H]`` accumulator per
        tile (too large for H = 4k-8k), so each tile would have to atomically add fp32 partials
        into both dHidden (V / BLOCK_V adds per element) and dW (N / BLOCK_N adds per element):
        ~N*V*H*4*(1/BLOCK_N + 1/BLOCK_V) bytes of L2 atomics, about as slow as the GEMMs
        themselves, and non-deterministic. The chunk costs ``N * C`` elements of memory
        (``_BWD_CHUNK_ELEMS``), never the full ``[N, V]``, and keeps dW bitwise deterministic.
        """
        hidden, weight, targets, log_z, mean_logit = ctx.saved_tensors
        inv_t, with_entropy, vocab_start, tp_group, cfg = ctx.meta
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n, h = hidden.shape
        v = weight.shape[0]
        d_hidden = torch.zeros(n, h, dtype=torch.float32, device=hidden.device) if need_h else None
        d_weight = torch.zeros_like(weight) if need_w else None
        use_ent = with_entropy and g_ent is not None
        if n and (need_h or need_w):
            g_lp = torch.zeros_like(log_z) if g_lp is None else g_lp.float().contiguous()
            g_ent = g_ent.float().contiguous() if use_ent else g_lp
            bn, bv = cfg["block_n"], cfg["block_v"]
            chunk = min(_cdiv(v, bv), max(1, _BWD_CHUNK_ELEMS // (n * bv))) * bv
            buf = torch.empty(n, chunk, dtype=hidden.dtype, device=hidden.device)
            for v0 in range(0, v, chunk):
                v1 = min(v, v0 + chunk)
                _bwd_kernel[(_cdiv(n, bn), _cdiv(v1 - v0, bv))](
                    hidden, weight, targets, log_z, mean_logit, g_lp, g_ent, buf,
                    n, h, hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
                    buf.stride(0), inv_t, vocab_start, v0, v1,
                    BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=cfg["block_h"], WITH_ENT=use_ent,
                    UPCAST=cfg["upcast"], PREC=cfg["prec"], num_warps=cfg["num_warps"],
                    num_stages=cfg["num_stages"],
                )
                if v1 - v0 < chunk:  # the last chunk's spare columns: a CPU bf16 GEMM reading
                    buf[:, v1 - v0:].zero_()  # d_logits may touch its row padding (NaN * 0 = NaN)
                d_logits = buf[:, : v1 - v0]  # [N, C] already divided by T
                if need_h:
                    if hidden.dtype == torch.float32:
                        d_hidden.addmm_(d_logits, weight[v0:v1])
                    else:  # cuBLAS accumulates each chunk in fp32; chunks sum in fp32 here
                        d_hidden += (d_logits @ weight[v0:v1]).float()
                if need_w:
                    d_weight[v0:v1] = d_logits.t() @ hidden
        if need_h:
            if tp_group is not None:  # every shard contributed to the replicated hidden
                dist.all_reduce(d_hidden, group=tp_group)
            d_hidden = d_hidden.to(hidden.dtype)
        return d_hidden, d_weight, None, None, None, None, None, None


def fused_logprobs(
    hidden: torch.Tensor,  # [N, H] fp32 or bf16
    weight: torch.Tensor,  # [V, H] (or vocab shard [V_local, H]), same dtype as hidden
    targets: torch.Tensor,  # [N] global token ids
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    vocab_start: int = 0,
    tp_group: dist.ProcessGroup | None = None,
    block_n: int | None = None,
    block_v: int | None = None,
    block_h: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Triton version of ``logprobs_from_hidden``: ``(logprobs [N], entropy [N] or None)`` fp32,
    differentiable w.r.t. ``hidden`` and ``weight``, without materialising the ``[N, V]`` logits.

    Block sizes (powers of two >= 16) default per device; on CPU the kernels need
    ``TRITON_INTERPRET=1`` set before triton is imported.
    """
    if triton is None:
        raise RuntimeError("fused_logprobs needs Triton; install it with `pip install triton`")
    _check_inputs(hidden, weight, targets, temperature, vocab_start, tp_group)
    if hidden.dtype not in (torch.float32, torch.bfloat16) or weight.dtype != hidden.dtype:
        raise ValueError(f"hidden and weight must share one dtype of float32, bfloat16; got "
                         f"{hidden.dtype} and {weight.dtype}")
    if hidden.device != weight.device or hidden.device != targets.device:
        raise ValueError(f"hidden, weight and targets must be on one device; got {hidden.device}, "
                         f"{weight.device}, {targets.device}")
    if hidden.device.type == "cpu" and not _INTERPRET:
        raise RuntimeError("fused_logprobs on CPU tensors needs TRITON_INTERPRET=1 set before "
                           "triton is imported; use CUDA tensors or the torch backend")
    cfg = _launch_config(hidden, block_n, block_v, block_h)
    out = _FusedLogprobs.apply(hidden, weight, targets.long().contiguous(), float(temperature),
                               bool(with_entropy), int(vocab_start), tp_group, cfg)
    if with_entropy:
        return out[0], out[1]
    return out, None
