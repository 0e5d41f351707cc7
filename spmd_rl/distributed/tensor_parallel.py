"""Tensor parallelism of the native decoder with DTensor plans (Megatron-LM, arXiv:1909.08053).

Per block: q/k/v and gate/up are column-parallel (each rank computes ``heads/tp`` heads and
``intermediate/tp`` features), o and down are row-parallel (one all-reduce each), so a block
costs two all-reduces forward and two backward. The embedding and the lm-head are split over the
vocabulary: the embedding sums partial lookups, and the lm-head is never applied as a module —
the trainer hands its local ``[V/tp, H]`` shard to the fused logprob (``kernels/logprob.py``),
which combines the partial log-sum-exp over the group instead of gathering ``[N, V]`` logits.
Norms stay replicated; Qwen3's per-head q/k norms meet only the local heads, so their gradients
are summed over the group in the backward. FSDP2 is applied afterwards over the data-parallel
dimensions.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from spmd_rl.errors import UserError
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


def block_plan(block: nn.Module | None = None) -> dict[str, object]:
    """The DTensor plan of one decoder block (module names relative to the block).

    A sparse (MoE) block's experts are not in the plan: ``SparseMoE.shard_experts`` splits them
    the same way but computes on local shards, so the whole block costs one all-reduce forward
    instead of two per expert (ColwiseParallel would all-reduce each expert's input gradient)."""
    plan = {
        "self_attn.q_proj": ColwiseParallel(),
        "self_attn.k_proj": ColwiseParallel(),
        "self_attn.v_proj": ColwiseParallel(),
        "self_attn.o_proj": RowwiseParallel(),
    }
    ffn = getattr(block, getattr(block, "ffn_name", "mlp"), None)
    if not isinstance(ffn, SparseMoE):
        plan.update({"mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(),
                     "mlp.down_proj": RowwiseParallel()})
    return plan


def apply_tp(decoder: nn.Module, tp_mesh: DeviceMesh) -> nn.Module:
    """Shard a native ``Transformer`` over ``tp_mesh`` in place; returns it."""
    check_tp_divisible(decoder.args, tp_mesh.size())
    for block in decoder.model.layers:
        parallelize_module(block, tp_mesh, block_plan(block))
        if block.self_attn.q_norm is not None:  # per-head norms see this rank's heads: partial gradients
            block.self_attn.q_norm.grad_sum_group = block.self_attn.k_norm.grad_sum_group = tp_mesh.get_group()
        ffn = getattr(block, block.ffn_name)
        if isinstance(ffn, SparseMoE):
            ffn.shard_experts(tp_mesh)
    parallelize_module(decoder.model.embed_tokens, tp_mesh,
                       RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()))
    if decoder.args.tie_word_embeddings:
        decoder.tie_weights()  # the lm-head is the (now vocab-sharded) embedding
    else:
        parallelize_module(decoder.lm_head, tp_mesh, ColwiseParallel(output_layouts=Shard(-1)))
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
    from torch.distributed.tensor import distribute_tensor

    local = distribute_tensor(full.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
    return param.to_local(), local.to_local()
