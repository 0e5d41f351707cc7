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

With ``dp_group=None`` every estimator returns what verl's ``core_algos`` returns on the same
inputs. Group samples live on one rank (see DESIGN.md), so group statistics need no collective;
``dp_group`` only matters for the batch-wide statistics: the whitening of ``gae``,
``reinforce_plus_plus`` and ``reinforce_plus_plus_baseline``, and the batch scale of ``gpg``.
With it, each data-parallel shard gets exactly its rows of the full-batch result.

Group statistics are scatter reductions (``index_add``) in float64, so no Python loop runs over
samples; only ``gae`` and ``reinforce_plus_plus`` scan over time, vectorised over the batch.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from spmd_rl.algorithms.masked import all_reduce_sum, masked_whiten

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


# --------------------------------------------------------------------------- group statistics


def _dense_groups(group_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(inverse [B], group_ids [G], G)``: a dense group id per sample and the original ids."""
    group_ids, inverse = torch.unique(group_index, return_inverse=True)
    return inverse, group_ids, group_ids.numel()


def _group_sum(x: torch.Tensor, inverse: torch.Tensor, num_groups: int) -> torch.Tensor:
    """``[G]`` sum of ``x [B]`` over each group."""
    return torch.zeros(num_groups, dtype=x.dtype, device=x.device).index_add(0, inverse, x)


def _group_moments(
    x: torch.Tensor, inverse: torch.Tensor, num_groups: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(count, mean, std)``, each ``[G]``, of ``x [B]`` (float64) per group; std is Bessel-corrected.

    A singleton group gets std 0 here (``clamp`` avoids 0/0); callers apply their own convention.
    """
    count = _group_sum(torch.ones_like(x), inverse, num_groups)
    mean = _group_sum(x, inverse, num_groups) / count
    # two-pass variance: as exact as torch.std on each group, unlike E[x^2] - E[x]^2
    sq_dev = _group_sum((x - mean[inverse]) ** 2, inverse, num_groups)
    std = (sq_dev / (count - 1).clamp(min=1)).sqrt()
    return count, mean, std


def group_mean_std(scores: torch.Tensor, group_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample mean and unbiased std of the sample's group.

    Args:
        scores: ``[B]`` one scalar per response.
        group_index: ``[B]`` int; equal values form a group.

    Returns:
        ``(mean [B], std [B])``. A group of size 1 gets mean 0 and std 1 (verl's convention),
        so its advantage is the raw score rather than an undefined 0/0.
    """
    inverse, _, num_groups = _dense_groups(group_index)
    # float64 sums: the result is then as exact as torch.mean/torch.std per group
    count, mean, std = _group_moments(scores.double(), inverse, num_groups)
    singleton = count == 1
    mean = torch.where(singleton, torch.zeros_like(mean), mean)
    std = torch.where(singleton, torch.ones_like(std), std)
    return mean[inverse].to(scores.dtype), std[inverse].to(scores.dtype)


# --------------------------------------------------------------------------- input checks


def _check_mask(name: str, token_rewards: torch.Tensor, response_mask: torch.Tensor) -> None:
    if token_rewards.dim() != 2 or response_mask.shape != token_rewards.shape:
        raise ValueError(
            f"{name}: token_rewards {tuple(token_rewards.shape)} and response_mask "
            f"{tuple(response_mask.shape)} must both be [B, T]"
        )


def _require_group_index(name: str, group_index: Any, token_rewards: torch.Tensor) -> torch.Tensor:
    """``group_index`` as a ``[B]`` tensor on the rewards' device, or ValueError naming ``name``."""
    if group_index is None:
        raise ValueError(f"{name} needs group_index: one int per response, equal for the same prompt")
    group_index = torch.as_tensor(group_index, device=token_rewards.device)
    if group_index.shape != token_rewards.shape[:1]:
        raise ValueError(
            f"{name}: group_index has shape {tuple(group_index.shape)}, expected ({token_rewards.shape[0]},)"
        )
    return group_index


def _outcome(scalars: torch.Tensor, token_rewards: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Broadcast one advantage per response ``[B]`` to its tokens ``[B, T]``, in the rewards' dtype."""
    return scalars.to(token_rewards.dtype).unsqueeze(-1) * response_mask


# --------------------------------------------------------------------------- estimators


@register_advantage_estimator("gae")
@torch.no_grad()
def compute_gae_advantages(
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
    """Generalised Advantage Estimation (Schulman et al. 2016, arXiv:1506.02438, Eq. 16).

    ``delta_t = r_t + gamma V_{t+1} - V_t``, ``A_t = delta_t + gamma lam A_{t+1}``, scanned from
    the last token back. ``V_{t+1}`` and ``A_{t+1}`` are those of the next *response* token:
    masked positions (padding, tool observations) are skipped and carry the running values.
    ``returns = A + values`` (before whitening); ``advantages`` is ``A`` whitened over the masked
    tokens of the batch (over ``dp_group`` when given), not multiplied by the mask, as in verl's
    ``compute_gae_advantage_return``. The mask must be 0/1.

    Args:
        token_rewards, response_mask, values: ``[B, T]``.

    Returns:
        ``(advantages [B, T], returns [B, T])``.
    """
    _check_mask("gae", token_rewards, response_mask)
    if values is None:
        raise ValueError("gae needs values: the critic's [B, T] value of every response token")
    if values.shape != token_rewards.shape:
        raise ValueError(f"gae: values has shape {tuple(values.shape)}, expected {tuple(token_rewards.shape)}")
    values = values.to(token_rewards.dtype)
    # [T, B] contiguous: every step of the scan reads and writes one contiguous row
    rewards_tb = token_rewards.t().contiguous()
    values_tb = values.t().contiguous()
    valid_tb = response_mask.bool().t().contiguous()
    gae_tb = torch.empty_like(rewards_tb)
    decay = gamma * lam
    next_value = torch.zeros_like(rewards_tb[0])  # [B] value of the next response token
    last_gae = torch.zeros_like(rewards_tb[0])  # [B]
    for t in range(rewards_tb.shape[0] - 1, -1, -1):
        delta = rewards_tb[t] + gamma * next_value - values_tb[t]
        candidate = delta + decay * last_gae
        # only response tokens advance the recursion; others keep (and report) the carried values
        next_value = torch.where(valid_tb[t], values_tb[t], next_value)
        last_gae = torch.where(valid_tb[t], candidate, last_gae, out=gae_tb[t])
    raw = gae_tb.t().contiguous()  # [B, T]
    returns = raw + values
    advantages = masked_whiten(raw, response_mask, dp_group=dp_group)
    return advantages, returns


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
    _check_mask("grpo", token_rewards, response_mask)
    group_index = _require_group_index("grpo", group_index, token_rewards)
    scores = token_rewards.sum(dim=-1)  # [B]
    mean, std = group_mean_std(scores, group_index)
    scalars = (scores - mean) / (std + eps) if norm_by_std else scores - mean  # [B]
    advantages = scalars.unsqueeze(-1) * response_mask  # [B, T]
    return advantages, advantages


@register_advantage_estimator("rloo")
@torch.no_grad()
def compute_rloo_advantages(
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
    """REINFORCE Leave-One-Out (Ahmadian et al. 2024, arXiv:2402.14740, Eq. 5).

    ``A_i = r_i - mean_{j != i} r_j``, written as ``r_i n/(n-1) - mean(r_group) n/(n-1)`` for a
    group of ``n > 1`` responses; a singleton group has no baseline and keeps ``r_i``. Broadcast
    to the response tokens. Matches verl's ``compute_rloo_outcome_advantage``.

    Args:
        token_rewards, response_mask: ``[B, T]``; group_index: ``[B]``.

    Returns:
        ``(advantages [B, T], returns [B, T])``, the same tensor.
    """
    _check_mask("rloo", token_rewards, response_mask)
    group_index = _require_group_index("rloo", group_index, token_rewards)
    inverse, _, num_groups = _dense_groups(group_index)
    scores = token_rewards.sum(dim=-1).double()  # [B]
    count, mean, _ = _group_moments(scores, inverse, num_groups)
    n, mean = count[inverse], mean[inverse]  # [B]
    others = (n - 1).clamp(min=1)  # clamp: singletons take the other branch, avoid 0/0
    scalars = torch.where(n > 1, scores * n / others - mean * n / others, scores)
    advantages = _outcome(scalars, token_rewards, response_mask)
    return advantages, advantages


@register_advantage_estimator("reinforce_plus_plus")
@torch.no_grad()
def compute_reinforce_plus_plus_advantages(
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
    """REINFORCE++ (Hu 2025, arXiv:2501.03262): discounted return-to-go, whitened over the batch.

    ``G_t = r_t + gamma G_{t+1}`` scanned backwards; the running return is zeroed on masked
    positions, so a return never crosses the end of a response. ``advantages`` is ``G`` whitened
    over the masked tokens (of the whole ``dp_group`` batch when given) times the mask. Matches
    verl's ``compute_reinforce_plus_plus_outcome_advantage``.

    Args:
        token_rewards, response_mask: ``[B, T]``.

    Returns:
        ``(advantages [B, T], returns [B, T])``; ``returns`` is ``G``.
    """
    _check_mask("reinforce_plus_plus", token_rewards, response_mask)
    rewards_tb = token_rewards.t().contiguous()  # [T, B]: contiguous rows for the scan
    mask_tb = response_mask.to(token_rewards.dtype).t().contiguous()
    returns_tb = torch.empty_like(rewards_tb)
    running = torch.zeros_like(rewards_tb[0])  # [B]
    for t in range(rewards_tb.shape[0] - 1, -1, -1):
        if gamma != 1.0:  # x * 1.0 == x: skip the multiply in the common undiscounted case
            running.mul_(gamma)
        torch.add(rewards_tb[t], running, out=returns_tb[t])
        # reset at padding, so the next response token starts afresh
        torch.mul(returns_tb[t], mask_tb[t], out=running)
    returns = returns_tb.t().contiguous()  # [B, T]
    advantages = masked_whiten(returns, response_mask, dp_group=dp_group) * response_mask
    return advantages, returns


@register_advantage_estimator("reinforce_plus_plus_baseline")
@torch.no_grad()
def compute_reinforce_plus_plus_baseline_advantages(
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
    """REINFORCE++-baseline (Hu 2025, arXiv:2501.03262): group-mean baseline, batch whitening.

    ``A_i = r_i - mean(r_group)`` (singleton groups: baseline 0), broadcast to the response
    tokens, then whitened over the masked tokens of the batch (of the whole ``dp_group`` batch
    when given) and multiplied by the mask: the group mean removes the prompt's difficulty, the
    batch-level std (instead of GRPO's per-group one) keeps the scale stable. Matches verl's
    ``compute_reinforce_plus_plus_baseline_outcome_advantage``.

    Args:
        token_rewards, response_mask: ``[B, T]``; group_index: ``[B]``.

    Returns:
        ``(advantages [B, T], returns [B, T])``, the same tensor.
    """
    _check_mask("reinforce_plus_plus_baseline", token_rewards, response_mask)
    group_index = _require_group_index("reinforce_plus_plus_baseline", group_index, token_rewards)
    scores = token_rewards.sum(dim=-1)  # [B]
    mean, _ = group_mean_std(scores, group_index)
    centred = _outcome(scores - mean, token_rewards, response_mask)  # [B, T]
    advantages = masked_whiten(centred, response_mask, dp_group=dp_group) * response_mask
    return advantages, advantages


@register_advantage_estimator("remax")
@torch.no_grad()
def compute_remax_advantages(
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
    """ReMax (Li et al. 2024, arXiv:2310.10505, Alg. 1): the greedy response's reward as baseline.

    ``returns_t = sum_{s >= t} r_s m_s`` (undiscounted reward-to-go) and
    ``advantages_t = returns_t - b m_t`` with ``b = reward_baselines`` the reward of the greedy
    decode of the same prompt. Matches verl's ``compute_remax_outcome_advantage``.

    Args:
        token_rewards, response_mask: ``[B, T]``; reward_baselines: ``[B]``.

    Returns:
        ``(advantages [B, T], returns [B, T])``.
    """
    _check_mask("remax", token_rewards, response_mask)
    if reward_baselines is None:
        raise ValueError("remax needs reward_baselines: the [B] reward of each prompt's greedy response")
    reward_baselines = torch.as_tensor(reward_baselines, device=token_rewards.device)
    if reward_baselines.shape != token_rewards.shape[:1]:
        raise ValueError(
            f"remax: reward_baselines has shape {tuple(reward_baselines.shape)}, "
            f"expected ({token_rewards.shape[0]},)"
        )
    returns = (token_rewards * response_mask).flip(dims=[-1]).cumsum(dim=-1).flip(dims=[-1])
    advantages = returns - reward_baselines.unsqueeze(-1) * response_mask
    return advantages, returns


@register_advantage_estimator("opo")
@torch.no_grad()
def compute_opo_advantages(
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
    """On-Policy RL with Optimal reward baseline (Hao et al. 2025, arXiv:2505.23585, Eq. 6).

    ``A_i = r_i - b`` with the length-weighted group baseline ``b = sum_j l_j r_j / sum_j l_j``,
    ``l_j`` the number of response tokens; it is the variance-minimising baseline when the
    gradient norm grows with the length. Singleton groups get ``b = 0``. Broadcast to the
    response tokens. Matches verl's ``compute_opo_outcome_advantage``.

    Args:
        token_rewards, response_mask: ``[B, T]``; group_index: ``[B]``.

    Returns:
        ``(advantages [B, T], returns [B, T])``, the same tensor.
    """
    _check_mask("opo", token_rewards, response_mask)
    group_index = _require_group_index("opo", group_index, token_rewards)
    inverse, _, num_groups = _dense_groups(group_index)
    scores = token_rewards.sum(dim=-1).double()  # [B]
    lengths = response_mask.sum(dim=-1).double()  # [B]
    count = _group_sum(torch.ones_like(scores), inverse, num_groups)
    baseline = _group_sum(lengths * scores, inverse, num_groups) / _group_sum(lengths, inverse, num_groups)
    baseline = torch.where(count > 1, baseline, torch.zeros_like(baseline))
    advantages = _outcome(scores - baseline[inverse], token_rewards, response_mask)
    return advantages, advantages


@register_advantage_estimator("gpg")
@torch.no_grad()
def compute_gpg_advantages(
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
    """Group Policy Gradient (Chu et al. 2025, arXiv:2504.02546, Eq. 8).

    ``A_i = alpha (r_i - mean(r_group)) / F_norm`` with ``F_norm = 1`` (no std division) and
    ``alpha = B / max(#{i: r_i != 0}, 1)``, which rescales the gradient up when many responses
    carry no reward signal. Singleton groups get mean 0. With ``dp_group``, ``B`` and the
    non-zero count are those of the whole data-parallel batch, so shards agree with one process.
    Matches verl's ``compute_gpg_outcome_advantage``.

    Args:
        token_rewards, response_mask: ``[B, T]``; group_index: ``[B]``.

    Returns:
        ``(advantages [B, T], returns [B, T])``, the same tensor.
    """
    _check_mask("gpg", token_rewards, response_mask)
    group_index = _require_group_index("gpg", group_index, token_rewards)
    scores = token_rewards.sum(dim=-1)  # [B]
    mean, _ = group_mean_std(scores.double(), group_index)
    counts = torch.stack(
        [torch.tensor(float(scores.shape[0]), dtype=torch.float64, device=scores.device),
         torch.count_nonzero(scores).double()]
    )
    batch, nonzero = all_reduce_sum(counts, dp_group).unbind()
    alpha = batch / nonzero.clamp(min=1)
    # F_norm = 1: the paper's optional std normalisation is off in verl
    advantages = _outcome(alpha * (scores.double() - mean), token_rewards, response_mask)
    return advantages, advantages


@register_advantage_estimator("grpo_passk")
@torch.no_grad()
def compute_grpo_passk_advantages(
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
    """Pass@k-style GRPO (Tang et al. 2025, arXiv:2503.19595): credit only the best response.

    In each group (at least 2 responses) the response with the highest score gets
    ``r_max - r_second`` (divided by ``std(r_group) + eps`` when ``norm_by_std``), every other
    response 0; a tied maximum gives 0 to all. Broadcast to the response tokens. Matches verl's
    ``compute_grpo_passk_outcome_advantage``.

    Args:
        token_rewards, response_mask: ``[B, T]``; group_index: ``[B]``.

    Returns:
        ``(advantages [B, T], returns [B, T])``, the same tensor.
    """
    _check_mask("grpo_passk", token_rewards, response_mask)
    group_index = _require_group_index("grpo_passk", group_index, token_rewards)
    inverse, group_ids, num_groups = _dense_groups(group_index)
    scores = token_rewards.sum(dim=-1).double()  # [B]
    count, _, std = _group_moments(scores, inverse, num_groups)
    if num_groups and bool((count < 2).any()):
        small = int(torch.nonzero(count < 2)[0])
        raise ValueError(
            f"grpo_passk needs at least 2 responses per group; group {group_ids[small].item()} "
            f"has {int(count[small])}"
        )
    neg_inf = torch.full((num_groups,), float("-inf"), dtype=torch.float64, device=scores.device)
    best = neg_inf.scatter_reduce(0, inverse, scores, reduce="amax")  # [G]
    is_best = scores == best[inverse]  # [B]
    num_best = _group_sum(is_best.double(), inverse, num_groups)  # [G]
    others = torch.where(is_best, torch.full_like(scores, float("-inf")), scores)
    runner_up = neg_inf.scatter_reduce(0, inverse, others, reduce="amax")  # [G]
    # a tied maximum is its own runner-up (top-2 of [m, m] is m, m), so the gap is 0
    runner_up = torch.where(num_best > 1, best, runner_up)
    gap = best - runner_up
    if norm_by_std:
        gap = gap / (std + eps)
    scalars = torch.where(is_best & (num_best[inverse] == 1), gap[inverse], torch.zeros_like(scores))
    advantages = _outcome(scalars, token_rewards, response_mask)
    return advantages, advantages
