"""Small collectives the trainer needs: metric reduction, global counts, gradient norm."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def all_reduce_sum(value: float | int, group=None, device: torch.device | str = "cpu") -> float:
    """Sum of a python number over ``group`` (None = world)."""
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t.item()


def reduce_metrics(metrics: dict[str, float], group=None, device: torch.device | str = "cpu") -> dict[str, float]:
    """Mean of each metric over ranks, except keys ending in ``/max`` (max) and ``/min`` (min).

    Every rank must pass the same keys; they are sorted so the collectives line up."""
    keys = sorted(metrics)
    out = {}
    for op, select in ((dist.ReduceOp.SUM, _is_mean), (dist.ReduceOp.MAX, _is_max), (dist.ReduceOp.MIN, _is_min)):
        chosen = [k for k in keys if select(k)]
        if not chosen:
            continue
        t = torch.tensor([float(metrics[k]) for k in chosen], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=op, group=group)
        if op == dist.ReduceOp.SUM:
            t /= dist.get_world_size(group)
        out.update(zip(chosen, t.tolist()))
    return out


def _is_max(key: str) -> bool:
    return key.endswith("/max")


def _is_min(key: str) -> bool:
    return key.endswith("/min")


def _is_mean(key: str) -> bool:
    return not (_is_max(key) or _is_min(key))


@torch.no_grad()
def clip_grad_norm_(parameters, max_norm: float) -> float:
    """Clip gradients by their global L2 norm; works whatever mesh each parameter lives on.

    ``torch.nn.utils.clip_grad_norm_`` fails when parameters sit on different meshes (FSDP x TP),
    so each DTensor's norm is made whole with ``full_tensor`` (one small collective per tensor)
    and the squares are summed locally. Returns the norm before clipping."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    squares = []
    for g in grads:
        norm = torch.linalg.vector_norm(g, dtype=torch.float32)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        squares.append(norm.square())
    total = torch.stack(squares).sum().sqrt()
    total_norm = total.item()
    if max_norm > 0 and math.isfinite(total_norm) and total_norm > max_norm:
        for g in grads:
            g.mul_(max_norm / (total_norm + 1e-6))
    return total_norm
