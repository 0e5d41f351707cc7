"""Ulysses sequence parallelism (DeepSpeed-Ulysses, arXiv:2309.14509) for packed batches.

Each of the ``sp`` ranks of a group holds a contiguous ``1/sp`` slice of the packed token row.
Around attention, one all-to-all turns "my tokens, all heads" into "all tokens, my heads", so
attention sees whole sequences (``cu_seqlens`` of the full row) for ``heads/sp`` heads; a second
all-to-all turns it back. Everything else in a block is per token and needs no communication.

The final hidden states are gathered back to the full row on every rank of the group, so the
logprob/value heads and the losses run unchanged. The gather's backward *sums* the gradient over
the group: every rank computes the same loss, so each rank's slice receives ``sp`` times its
gradient, and FSDP's mean over the ``dp x sp`` ranks then yields exactly the single-process
gradient with the trainer's usual ``x dp_size`` loss scaling.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist

from spmd_rl.errors import UserError
from spmd_rl.kernels.varlen_attention import varlen_attention


@dataclass
class SequenceShard:
    """This rank's slice of a packed row, padded so the row splits evenly over the group."""

    input_ids: torch.Tensor  # [1, N_local]
    position_ids: torch.Tensor  # [1, N_local]
    cu_seqlens: torch.Tensor  # [S(+1)+1] offsets of the full padded row (a padding sequence last)
    total: int  # N, tokens of the unpadded row


def shard_packed_row(input_ids: torch.Tensor, position_ids: torch.Tensor, cu_seqlens: torch.Tensor,
                     group: dist.ProcessGroup) -> SequenceShard:
    """Pad the packed row ``[1, N]`` to a multiple of the group size and keep this rank's slice.

    The padding tokens form one extra sequence at the end, so no real token attends to them."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    total = input_ids.shape[1]
    padded = -(-total // size) * size
    if padded > total:
        pad = padded - total
        input_ids = torch.nn.functional.pad(input_ids, (0, pad))
        position_ids = torch.cat([position_ids, torch.arange(pad, device=position_ids.device)[None]], dim=1)
        cu_seqlens = torch.cat([cu_seqlens, cu_seqlens.new_tensor([padded])])
    local = padded // size
    piece = slice(rank * local, (rank + 1) * local)
    return SequenceShard(input_ids[:, piece], position_ids[:, piece], cu_seqlens, total)


def seq_to_heads(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """``[N_local, H, D]`` (my tokens, all heads) -> ``[N, H/sp, D]`` (all tokens, my heads)."""
    return _SeqToHeads.apply(x, group)


def heads_to_seq(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """``[N, H/sp, D]`` -> ``[N_local, H, D]``, the inverse of :func:`seq_to_heads`."""
    return _HeadsToSeq.apply(x, group)


def gather_sequence(x: torch.Tensor, group: dist.ProcessGroup, total: int) -> torch.Tensor:
    """All-gather ``[N_local, ...]`` slices into the full ``[total, ...]`` row (padding dropped);
    the backward sums gradients over the group (see the module docstring)."""
    return _GatherSequence.apply(x, group)[:total]


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, *,
                      group: dist.ProcessGroup, **attention_kwargs) -> torch.Tensor:
    """Packed causal attention of this rank's tokens ``q [N_local, Hq, D]``, ``k, v [N_local, Hkv, D]``
    against whole sequences: heads are exchanged so attention runs on all ``N`` tokens of
    ``cu_seqlens`` (the full padded row) for ``Hq/sp`` heads, then exchanged back."""
    size = dist.get_world_size(group)
    if k.shape[1] % size:  # fewer kv heads than ranks: each rank gets a copy of the one its queries use
        k, v = (t.repeat_interleave(size // t.shape[1], dim=1) for t in (k, v))
    q, k, v = (seq_to_heads(t, group) for t in (q, k, v))
    return heads_to_seq(varlen_attention(q, k, v, cu_seqlens, **attention_kwargs), group)


def apply_sequence_parallel(decoder: torch.nn.Module, group: dist.ProcessGroup, tp: int = 1) -> None:
    """Make every attention layer of a native decoder attend through :func:`ulysses_attention`
    (``tp``: the tensor-parallel degree, which already divides the heads)."""
    args = decoder.args
    check_heads_divisible(args.num_heads // tp, args.num_kv_heads // tp, dist.get_world_size(group))
    for layer in decoder.model.layers:
        layer.self_attn.packed_attention = functools.partial(ulysses_attention, group=group)


def check_heads_divisible(num_heads: int, num_kv_heads: int, sp: int) -> None:
    """Ulysses splits attention heads over the sp ranks: sp must divide the query heads (per tp
    rank), and divide or be a multiple of the key/value heads (then they are replicated)."""
    if num_heads % sp or (num_kv_heads % sp and sp % num_kv_heads):
        raise UserError(
            f"parallel.sp={sp} must divide the {num_heads} query heads per tensor-parallel rank and divide "
            f"or be a multiple of the {num_kv_heads} key/value heads: choose another parallel.sp")


def _all_to_all(x: torch.Tensor, group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Split ``x`` into group-size chunks along ``scatter_dim``, send chunk i to rank i, and
    concatenate what arrives along ``gather_dim``."""
    size = dist.get_world_size(group)
    inputs = [c.contiguous() for c in x.chunk(size, dim=scatter_dim)]
    outputs = [torch.empty_like(inputs[0]) for _ in range(size)]
    dist.all_to_all(outputs, inputs, group=group)
    return torch.cat(outputs, dim=gather_dim)


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_to_all(x, group, scatter_dim=1, gather_dim=0)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all(grad, ctx.group, scatter_dim=0, gather_dim=1), None


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_to_all(x, group, scatter_dim=0, gather_dim=1)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all(grad, ctx.group, scatter_dim=1, gather_dim=0), None


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group, ctx.rank, ctx.local = group, dist.get_rank(group), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank * ctx.local : (ctx.rank + 1) * ctx.local], None
