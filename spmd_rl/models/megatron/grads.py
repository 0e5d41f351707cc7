"""Gradients of a megatron-core policy stage: data-parallel sum, tied-embedding sync, the global
norm over the TP x PP grid, clipping and the optimizer step.

We drive GPTModel with plain torch autograd and a torch optimizer (or our ZeRO-1 AdamW,
:mod:`.distributed_optimizer`), not megatron's DDP and distributed optimizer, so the
collectives megatron's ``finalize_model_grads`` would run are done here, with the same rules:

* data parallel: the loss is already normalised by the global token (or sequence) count of the
  mini-batch, so the gradients are summed over the dp group (gloo has no average); under
  expert parallelism an expert's gradient is summed over the dp ranks that hold that expert
  (megatron's expert-data-parallel group, dp / ep ranks): each token's contribution to it
  was already computed on the rank that holds it, whichever dp rank the token came from;
* tied embeddings split over stages: the first stage's embedding and the last stage's
  ``output_layer`` copy get the sum of both gradients (megatron's embedding group), which is
  the gradient of the single tied matrix, so the two copies stay equal after the step;
* per-head q/k layernorms (Qwen3) are replicated over TP but each rank applies them to its own
  heads, so their gradients are partial sums: summed over the TP group (as megatron's
  ``finalize_model_grads`` does for ``qk_layernorm``);
* the norm counts every element once: TP-sharded tensors on every TP rank, replicated ones
  (norms) on TP rank 0 only, the tied copy on the first stage only, then a sum over the
  model-parallel (TP x PP) group (megatron's ``param_is_not_tensor_parallel_duplicate``); the
  experts' squares are summed over the expert-model-parallel (EP x PP) group instead, since
  every ep rank holds other experts.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from spmd_rl.models.megatron.names import OUTPUT_LAYER, is_expert_param


def grads_of(model: torch.nn.Module) -> list[torch.Tensor]:
    """The gradient of every parameter, a zero tensor where backward left none (so every rank
    of a group passes the same number of tensors to the collectives)."""
    out = []
    for p in model.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        out.append(p.grad)
    return out


def all_reduce_grads(model: torch.nn.Module, groups) -> None:
    """Sum every gradient over data parallel (module doc): the dense ones over ``groups.dp``, the
    experts' over ``groups.expert_dp``; one flat buffer, one collective, each."""
    named = list(model.named_parameters())
    experts_reduced = any(is_expert_param(n) for n, _ in named) and groups.expert_dp_size > 1
    if groups.dp_size == 1 and not experts_reduced:
        return
    grads_of(model)  # a zero gradient wherever backward left none: every rank sends as many
    dense = [p.grad for n, p in named if not is_expert_param(n)]
    experts = [p.grad for n, p in named if is_expert_param(n)]
    if groups.dp_size > 1 and dense:
        sum_in_place(dense, groups.dp)
    if experts_reduced:
        sum_in_place(experts, groups.expert_dp)


def sum_in_place(tensors: list[torch.Tensor], group) -> None:
    """Sum ``tensors`` over ``group`` in place with one collective (through a flat copy)."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


PER_HEAD_NORMS = ("q_layernorm.weight", "k_layernorm.weight")


def sum_per_head_norm_grads(model: torch.nn.Module, tp_group, tp_size: int) -> None:
    """Sum the q/k layernorm gradients over TP (one flat collective; module doc)."""
    if tp_size == 1:
        return
    params = [p for name, p in model.named_parameters() if name.endswith(PER_HEAD_NORMS) and p.grad is not None]
    if not params:
        return
    sum_in_place([p.grad for p in params], tp_group)


def tied_embedding_weight(model: torch.nn.Module, first: bool, last: bool) -> torch.Tensor | None:
    """This stage's copy of a tied embedding split over stages: the embedding on the first
    stage, ``output_layer`` on the last (None elsewhere)."""
    if first:
        return model.embedding.word_embeddings.weight
    return model.output_layer.weight if last else None


def sync_tied_embedding_grads(weight: torch.Tensor, embedding_group) -> None:
    """Sum the two copies' gradients over the embedding group (first and last stage)."""
    if weight.grad is None:
        weight.grad = torch.zeros_like(weight)
    dist.all_reduce(weight.grad, group=embedding_group)


def counted_once(name: str, param: torch.Tensor, tp_rank: int, skip_tied_copy: bool) -> bool:
    """Whether this rank's ``param`` enters the global norm (see the module doc)."""
    if skip_tied_copy and (name == OUTPUT_LAYER or name.endswith("." + OUTPUT_LAYER)):
        return False
    return bool(getattr(param, "tensor_model_parallel", False)) or tp_rank == 0


@torch.no_grad()
def global_grad_norm(model: torch.nn.Module, *, tp_rank: int, groups, skip_tied_copy: bool) -> float:
    """L2 norm of the whole model's gradient, the same on every rank of the TP x PP (x EP) grid."""
    squares = torch.zeros(2, dtype=torch.float64)  # dense, experts
    for name, p in model.named_parameters():
        if p.grad is not None and counted_once(name, p, tp_rank, skip_tied_copy):
            square = torch.linalg.vector_norm(p.grad, dtype=torch.float32).double().square().cpu()
            squares[int(is_expert_param(name))] += square
    return math.sqrt(sum_squares_over_grid(squares, groups))


def sum_squares_over_grid(squares: torch.Tensor, groups) -> float:
    """``squares = [dense, experts]`` summed over the groups that hold other parts of the model:
    dense over TP x PP, experts over EP x PP (module doc)."""
    dense, experts = squares[:1].clone(), squares[1:].clone()
    dist.all_reduce(dense, group=groups.model_parallel)
    if getattr(groups, "expert_model_parallel", None) is not None:
        dist.all_reduce(experts, group=groups.expert_model_parallel)
    return float(dense.item() + experts.item())


@torch.no_grad()
def clip_grads_(model: torch.nn.Module, total_norm: float, max_norm: float) -> None:
    """Scale gradients by ``max_norm / norm`` when the norm exceeds it (as ``torch.nn.utils.clip_grad_norm_``)."""
    if max_norm > 0 and math.isfinite(total_norm) and total_norm > max_norm:
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(max_norm / (total_norm + 1e-6))


def optimizer_step(model: torch.nn.Module, optimizer, scheduler, grad_clip: float, *, groups, tp_rank: int,
                   skip_tied_copy: bool, tied: torch.Tensor | None = None) -> float:
    """Reduce the gradients over dp (and the tied embedding's over its group), clip by the
    global norm, step (skipped when the norm is not finite: every rank sees the same norm, so
    all skip together), advance the schedule, clear gradients; return the norm.

    ``optimizer`` is a torch optimizer over the whole stage (gradients all-reduced over dp) or a
    :class:`.distributed_optimizer.ShardedAdamW` (reduce-scattered; each rank steps its range)."""
    sum_per_head_norm_grads(model, groups.tp, groups.tp_size)
    if getattr(optimizer, "reduce_grads", None) is not None:  # ZeRO-1: the tied sum first, then dp
        if tied is not None:
            sync_tied_embedding_grads(tied, groups.embedding)
        optimizer.reduce_grads()
        norm = optimizer.grad_norm(groups.model_parallel)
        optimizer.clip_grads_(norm, grad_clip)
    else:
        all_reduce_grads(model, groups)
        if tied is not None:
            sync_tied_embedding_grads(tied, groups.embedding)
        norm = global_grad_norm(model, tp_rank=tp_rank, groups=groups, skip_tied_copy=skip_tied_copy)
        clip_grads_(model, norm, grad_clip)
    if math.isfinite(norm):
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def begin_update(optimizer) -> None:
    """Before an update's first backward: the distributed optimizer's gradient buffer."""
    if getattr(optimizer, "allocate_grads", None) is not None:
        optimizer.allocate_grads()


def end_update(optimizer) -> None:
    """After an update's last step: free the distributed optimizer's gradient buffer (the
    whole-state path's gradients are already freed by ``zero_grad(set_to_none=True)``)."""
    if getattr(optimizer, "release_grads", None) is not None:
        optimizer.release_grads()
