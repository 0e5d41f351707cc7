"""Advantage estimators, selected by name from ``algorithm.adv_estimator``.

All estimators share one signature so that the trainer calls them the same way::

    fn(token_rewards,            # [B, T] reward per response token (outcome score on the last one)
       response_mask,            # [B, T] 1 on response tokens, 0 on padding
       *, values=None,           # [B, T] critic values (GAE)
       group_index=None,         # [B] int, equal for responses of the same prompt
       reward_baselines=None,    # [B] baseline rewards (ReMax)
       gamma=1.0, lam=1.0, norm_by_std=True, eps=1e-6,
       dp_group=None)            # data-parallel group for batch-wide statistics
    -> (advantages [B, T], returns [B, T])

Group samples live on one rank (see DESIGN.md), so group-relative estimators need no
collective; ``dp_group`` is for estimators that whiten over the whole batch.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

AdvantageEstimator = Callable[..., "tuple[torch.Tensor, torch.Tensor]"]

ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {}


def register_advantage_estimator(name: str) -> Callable[[AdvantageEstimator], AdvantageEstimator]:
    """Decorator: make ``fn`` available as ``algorithm.adv_estimator=<name>``."""

    def decorator(fn: AdvantageEstimator) -> AdvantageEstimator:
        if name in ADVANTAGE_ESTIMATORS and ADVANTAGE_ESTIMATORS[name] is not fn:
            raise ValueError(f"advantage estimator {name!r} is already registered")
        ADVANTAGE_ESTIMATORS[name] = fn
        return fn

    return decorator


def get_advantage_estimator(name: str) -> AdvantageEstimator:
    """Look up an estimator by name; ValueError lists the valid names."""
    if name not in ADVANTAGE_ESTIMATORS:
        valid = ", ".join(sorted(ADVANTAGE_ESTIMATORS))
        raise ValueError(f"unknown advantage estimator {name!r}; valid names: {valid}")
    return ADVANTAGE_ESTIMATORS[name]


def group_mean_std(scores: torch.Tensor, group_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample mean and unbiased std of the sample's group.

    Args:
        scores: ``[B]`` one scalar per response.
        group_index: ``[B]`` int; equal values form a group.

    Returns:
        ``(mean [B], std [B])``. A group of size 1 gets mean 0 and std 1 (verl's convention),
        so its advantage is the raw score rather than an undefined 0/0.
    """
    _, inverse = torch.unique(group_index, return_inverse=True)  # [B] dense group ids
    num_groups = int(inverse.max()) + 1 if inverse.numel() else 0
    # float64 sums: the result is then as exact as torch.mean/torch.std per group
    x = scores.double()
    zeros = torch.zeros(num_groups, dtype=torch.float64, device=x.device)
    count = zeros.index_add(0, inverse, torch.ones_like(x))  # [G]
    total = zeros.index_add(0, inverse, x)  # [G]
    mean = total / count  # [G]
    sq_dev = zeros.index_add(0, inverse, (x - mean[inverse]) ** 2)  # [G]
    std = (sq_dev / (count - 1).clamp(min=1)).sqrt()  # [G] Bessel-corrected
    singleton = count == 1
    mean = torch.where(singleton, torch.zeros_like(mean), mean)
    std = torch.where(singleton, torch.ones_like(std), std)
    return mean[inverse].to(scores.dtype), std[inverse].to(scores.dtype)


@register_advantage_estimator("grpo")
@torch.no_grad()
def compute_grpo_advantages(
    token_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    values: torch.Tensor | None = None,
    group_index: torch.Tensor | None = None,
    reward_baselines: torch.Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 1.0,
    norm_by_std: bool = True,
    eps: float = 1e-6,
    dp_group: Any | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO outcome advantages (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300, Sec. 4.1.2).

    ``A_i = (r_i - mean(r_group)) / (std(r_group) + eps)`` broadcast to every response token,
    with ``r_i = token_rewards[i].sum()``. ``norm_by_std=False`` drops the division, as in
    Dr. GRPO (Liu et al. 2025, arXiv:2503.20783), which removes the difficulty bias of the std.
    ``values``, ``reward_baselines``, ``gamma``, ``lam`` and ``dp_group`` are unused: groups are
    rank-local. Matches verl's ``compute_grpo_outcome_advantage``.

    Returns:
        ``(advantages [B, T], returns [B, T])``; both are the same tensor for outcome rewards.
    """
    if group_index is None:
        raise ValueError("grpo needs group_index: one int per response, equal for the same prompt")
    group_index = torch.as_tensor(group_index, device=token_rewards.device)
    if group_index.shape != token_rewards.shape[:1]:
        raise ValueError(f"group_index has shape {tuple(group_index.shape)}, expected ({token_rewards.shape[0]},)")
    scores = token_rewards.sum(dim=-1)  # [B]
    mean, std = group_mean_std(scores, group_index)
    scalars = (scores - mean) / (std + eps) if norm_by_std else scores - mean  # [B]
    advantages = scalars.unsqueeze(-1) * response_mask  # [B, T]
    return advantages, advantages
