"""Tensor parallelism of the native decoder (Megatron-LM, arXiv:1909.08053).

Per block: q/k/v and gate/up are column-parallel (each rank computes ``heads/tp`` heads and
``intermediate/tp`` features), o and down are row-parallel (one all-reduce each), so a block
costs two all-reduces forward and two backward: the attention's and the MLP's input is marked
once for a summed gradient (Megatron's ``f``, a forward pre-hook), however many projections
read it. The weights are DTensors (so FSDP2, DCP and the weight loaders see their layout), but
a block computes on their local shards with explicit collectives: no DTensor dispatch per op,
and a ``torch.compile``d block traces plain tensors (DTensor's backward under dynamic shapes
does not compile in torch 2.13). The embedding and the lm-head are split over the vocabulary:
the embedding sums partial lookups (one all-reduce), and the lm-head is never applied as a
module — the trainer hands its local ``[V/tp, H]`` shard to the fused logprob
(``kernels/logprob.py``), which combines the partial log-sum-exp over the group instead of
gathering ``[N, V]`` logits. Norms stay replicated; Qwen3's per-head q/k norms meet only the
local heads, so their gradients are summed over the group in the backward. FSDP2 is applied
afterwards over the data-parallel dimensions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from spmd_rl.errors import UserError
from spmd_rl.kernels.logprob import copy_to_tensor_parallel, reduce_from_tensor_parallel
from spmd_rl.models.moe import SparseMoE


def check_tp_divisible(args, tp: int) -> None:
    """Every sharded dimension must split evenly over the tp ranks."""
    # The vocabulary may split unevenly (torch.chunk sizes); the logprob handles any vocab_start.
    sizes = {"attention heads": args.num_heads, "key/value heads": args.num_kv_heads}
    sparse = set(args.moe_layers)
    if len(sparse) < args.num_layers:  # some layer keeps a dense MLP
        sizes["intermediate size"] = args.intermediate_size
    if sparse:
        sizes["expert intermediate size"] = args.moe_intermediate_size
    bad = [f"{name} {n}" for name, n in sizes.items() if n % tp]
    if bad:
        raise UserError(f"parallel.tp={tp} must divide the model's {', '.join(bad)}: choose a tp that divides them")


class ColumnParallelLinear(nn.Module):
    """This rank's output features of a linear layer, ``x @ W_local.T + b_local``, with no
    collective: the enclosing attention/MLP marks ``x`` for a summed gradient once for all the
    projections that read it (``_sum_input_grad_over``). ``weight``/``bias`` are ``Shard(0)``
    DTensors."""

    def __init__(self, linear: nn.Linear, tp_mesh: DeviceMesh) -> None:
        super().__init__()
        self.weight = _distributed_parameter(linear.weight, tp_mesh, Shard(0))
        self.bias = None if linear.bias is None else _distributed_parameter(linear.bias, tp_mesh, Shard(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to_local()
        return F.linear(x, self.weight.to_local(), bias)


class RowParallelLinear(nn.Module):
    """A linear layer over this rank's input features: the partial outputs are summed over
    the group (one all-reduce), then the replicated bias is added once. ``weight`` is a
    ``Shard(1)`` DTensor, ``bias`` a ``Replicate()`` one."""

    def __init__(self, linear: nn.Linear, tp_mesh: DeviceMesh) -> None:
        super().__init__()
        self.weight = _distributed_parameter(linear.weight, tp_mesh, Shard(1))
        self.bias = None if linear.bias is None else _distributed_parameter(linear.bias, tp_mesh, Replicate())
        self.tp_mesh = tp_mesh  # the mesh, not its process group: the module stays deep-copyable

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = reduce_from_tensor_parallel(F.linear(x, self.weight.to_local()), self.tp_mesh.get_group())
        return out if self.bias is None else out + self.bias.to_local()


class VocabParallelEmbedding(nn.Module):
    """This rank's rows of the embedding (a ``Shard(0)`` DTensor, split like ``torch.chunk``):
    tokens it owns are looked up, the others give zeros, and the partial embeddings are summed
    over the group. The output is a plain tensor, so a compiled first block receives it with
    its autograd history (DTensor's async ``to_local`` result reached a compiled block as a
    leaf, and the embedding got no gradient)."""

    def __init__(self, embedding: nn.Embedding, tp_mesh: DeviceMesh) -> None:
        super().__init__()
        self.weight = _distributed_parameter(embedding.weight, tp_mesh, Shard(0))
        self.tp_mesh = tp_mesh
        self.vocab_start = tp_mesh.get_local_rank() * -(-embedding.weight.shape[0] // tp_mesh.size())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = self.weight.to_local()
        rows = ids - self.vocab_start
        owned = (rows >= 0) & (rows < local.shape[0])
        if local.shape[0] == 0:  # a tiny vocabulary leaves the last ranks no rows
            partial = local.new_zeros(*ids.shape, local.shape[1])
        else:
            # where, not a product with the mask: a row that is not ours contributes exact zeros
            partial = torch.where(owned.unsqueeze(-1), F.embedding(torch.where(owned, rows, 0), local), 0.0)
        return reduce_from_tensor_parallel(partial, self.tp_mesh.get_group())


def _distributed_parameter(param: nn.Parameter, tp_mesh: DeviceMesh, placement) -> nn.Parameter:
    # Every rank holds the same full tensor (same seed or same checkpoint): each cuts its own
    # slice, no communication (also on the meta device).
    return nn.Parameter(distribute_tensor(param.data, tp_mesh, [placement], src_data_rank=None),
                        requires_grad=param.requires_grad)


def shard_experts(moe: SparseMoE, tp_mesh: DeviceMesh) -> None:
    """Every expert's gate/up split by output features, down by input features; the router stays
    replicated. The MoE forward then sums the experts' partial outputs locally and all-reduces
    once; the backward all-reduces the experts' input gradient and the routing weights' gradient
    once each, whatever the number of experts."""
    for expert in moe.experts:
        for name, dim in zip(expert.names, (0, 0, 1)):
            linear = getattr(expert, name)
            linear.weight = _distributed_parameter(linear.weight, tp_mesh, Shard(dim))
    moe.tp_mesh = tp_mesh


def shard_block(block: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Replace one decoder block's projections by their column/row-parallel forms (same
    parameter names) and mark where the group's gradients meet. A sparse (MoE) block's
    experts are split the same way by :func:`shard_experts`; the router stays replicated."""
    attn, group = block.self_attn, tp_mesh.get_group()
    for name in ("q_proj", "k_proj", "v_proj"):
        setattr(attn, name, ColumnParallelLinear(getattr(attn, name), tp_mesh))
    attn.o_proj = RowParallelLinear(attn.o_proj, tp_mesh)
    _sum_input_grad_over(attn, group)
    if attn.q_norm is not None:  # per-head norms see this rank's heads: partial gradients
        attn.q_norm.grad_sum_group = attn.k_norm.grad_sum_group = group
    ffn = getattr(block, block.ffn_name)
    if isinstance(ffn, SparseMoE):
        shard_experts(ffn, tp_mesh)
        return
    ffn.gate_proj = ColumnParallelLinear(ffn.gate_proj, tp_mesh)
    ffn.up_proj = ColumnParallelLinear(ffn.up_proj, tp_mesh)
    ffn.down_proj = RowParallelLinear(ffn.down_proj, tp_mesh)
    _sum_input_grad_over(ffn, group)


def _sum_input_grad_over(module: nn.Module, group) -> None:
    """The column-parallel projections inside ``module`` each see its whole input but compute
    only this rank's heads/features, so the input's gradient is a partial sum over ``group``:
    one all-reduce in the backward, at the module's input, however many projections read it."""

    def hook(_module, args):
        return (copy_to_tensor_parallel(args[0], group), *args[1:])

    module.register_forward_pre_hook(hook)


def apply_tp(decoder: nn.Module, tp_mesh: DeviceMesh) -> nn.Module:
    """Shard a native ``Transformer`` over ``tp_mesh`` in place; returns it."""
    check_tp_divisible(decoder.args, tp_mesh.size())
    for block in decoder.model.layers:
        shard_block(block, tp_mesh)
    decoder.model.embed_tokens = VocabParallelEmbedding(decoder.model.embed_tokens, tp_mesh)
    if decoder.args.tie_word_embeddings:
        decoder.tie_weights()  # the lm-head is the (now vocab-sharded) embedding
    else:
        # Never applied as a module (module docstring): only its weight is split, by vocabulary.
        decoder.lm_head.weight = _distributed_parameter(decoder.lm_head.weight, tp_mesh, Shard(0))
    return decoder


def local_vocab_shard(weight: torch.Tensor, tp_mesh_dim: str = "tp") -> tuple[torch.Tensor, int, object]:
    """``(local rows, vocab_start, tp group)`` of a vocab-sharded lm-head weight, or
    ``(weight, 0, None)`` when it is not sharded over ``tp``.

    The weight may also be sharded by FSDP; callers use it inside the FSDP root's forward, where
    FSDP has already gathered its dp shards, so only the tp placement remains."""
    if not isinstance(weight, DTensor):
        return weight, 0, None
    mesh = weight.device_mesh
    names = mesh.mesh_dim_names or ()
    if tp_mesh_dim not in names or mesh[tp_mesh_dim].size() == 1:
        return weight.to_local(), 0, None
    dim = names.index(tp_mesh_dim)
    if weight.placements[dim] != Shard(0):
        raise ValueError(f"the lm-head weight is {weight.placements[dim]} over tp; expected Shard(0) (vocab)")
    tp_mesh = mesh[tp_mesh_dim]
    local = weight.to_local()
    # torch splits Shard(0) like torch.chunk: every rank but possibly the last has ceil(V / tp) rows.
    rows_per_rank = -(-weight.shape[0] // tp_mesh.size())
    return local, tp_mesh.get_local_rank() * rows_per_rank, tp_mesh.get_group()


def gather_vocab_logits(local_logits: torch.Tensor, group, vocab_size: int) -> torch.Tensor:
    """``[B, V_local]`` logits of this rank's vocab slice -> the full ``[B, V]`` on every rank
    (for sampling, which needs the whole distribution). Slices follow torch's Shard(0) split."""
    import torch.distributed as dist

    size = dist.get_world_size(group)
    rows_per_rank = -(-vocab_size // size)
    padded = torch.nn.functional.pad(local_logits, (0, rows_per_rank - local_logits.shape[-1]))
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat(parts, dim=-1)[..., :vocab_size]


def full_to_local(param: torch.Tensor, full: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(destination, source)`` for copying a full-shape tensor into ``param``: for a DTensor the
    local shard and this rank's slice of ``full`` (cut locally, no communication), else both as is."""
    if not isinstance(param, DTensor):
        return param, full
    local = distribute_tensor(full.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
    return param.to_local(), local.to_local()
