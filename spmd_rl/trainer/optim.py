"""AdamW and the learning-rate schedule (linear warmup, then constant or cosine)."""

from __future__ import annotations

import math

import torch
from torch import nn

from spmd_rl.config import OptimConfig
from spmd_rl.distributed.collectives import clip_grad_norm_


def compute_lr_factor(step: int, *, warmup_steps: int, total_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """Multiplier of the peak LR at optimizer step ``step`` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters (fused kernel on CUDA)."""
    params = [p for p in model.parameters() if p.requires_grad]
    on_cuda = bool(params) and params[0].device.type == "cuda"
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             weight_decay=cfg.weight_decay, fused=on_cuda or None)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    """LambdaLR applying :func:`compute_lr_factor`; ``total_steps`` counts optimizer steps."""
    def factor(step: int) -> float:
        return compute_lr_factor(step, warmup_steps=cfg.warmup_steps, total_steps=total_steps,
                                 schedule=cfg.lr_schedule, min_lr_ratio=cfg.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, grad_clip: float) -> float:
    """Clip by the global gradient norm, step optimizer and schedule, clear gradients; return the norm.

    A NaN/Inf norm skips the optimizer step (one bad batch must not poison the weights and Adam's
    moments); the norm is global, so every rank skips together. The schedule still advances."""
    grad_norm = clip_grad_norm_(model.parameters(), grad_clip)
    if math.isfinite(grad_norm):
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm
