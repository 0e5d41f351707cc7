"""``sum_grad_over``: identity forward, gradient summed over a process group in the backward.

Under tensor parallelism a replicated tensor that only meets this rank's slice of the work (a
per-head norm weight applied to the local heads, the routing weights that scale the local
slices of the experts' outputs) receives a partial gradient on each rank; the true gradient is
the sum over the group (megatron's "copy to tensor-parallel region")."""

from __future__ import annotations

import torch
import torch.distributed._functional_collectives as funcol


class _SumGradOver(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # A functional collective, as DTensor's own (whose async ones may be in flight on the group)
        summed = funcol.all_reduce(grad.contiguous(), "sum", ctx.group)
        return funcol.wait_tensor(summed), None


def sum_grad_over(x: torch.Tensor, group) -> torch.Tensor:
    return _SumGradOver.apply(x, group)
