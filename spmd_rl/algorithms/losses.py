"""Policy losses, loss aggregation over tokens/sequences, and entropy.

Policy losses are selected by name from ``actor.policy_loss`` and share one signature::

    fn(logprobs, old_logprobs, advantages, response_mask,   # each [B, T]
       *, clip_low=0.2, clip_high=0.2, clip_c=3.0, agg_mode="token-mean",
       global_tokens=None, global_seqs=None, **mode_options) -> (loss 0-d, metrics)

``metrics`` maps a short name (``pg_clipfrac``...) to a detached 0-d tensor; the caller prefixes
and reduces them. ``global_tokens`` / ``global_seqs`` are counts over the whole data-parallel
batch, computed by the caller, so that every shard's loss can be summed (see ``aggregate_loss``).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from spmd_rl.algorithms.masked import masked_mean, masked_sum

PolicyLoss = Callable[..., "tuple[torch.Tensor, dict[str, torch.Tensor]]"]

POLICY_LOSSES: dict[str, PolicyLoss] = {}

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")

# exp() of a log-ratio beyond this overflows or makes one token dominate the batch
_LOG_RATIO_CLAMP = 20.0


def register_policy_loss(name: str) -> Callable[[PolicyLoss], PolicyLoss]:
    """Decorator: make ``fn`` available as ``actor.policy_loss=<name>``."""

    def decorator(fn: PolicyLoss) -> PolicyLoss:
        if name in POLICY_LOSSES and POLICY_LOSSES[name] is not fn:
            raise ValueError(f"policy loss {name!r} is already registered")
        POLICY_LOSSES[name] = fn
        return fn

    return decorator


def get_policy_loss(name: str) -> PolicyLoss:
    """Look up a policy loss by name; ValueError lists the valid names."""
    if name not in POLICY_LOSSES:
        raise ValueError(f"unknown policy loss {name!r}; valid names: {', '.join(sorted(POLICY_LOSSES))}")
    return POLICY_LOSSES[name]


def aggregate_loss(
    loss_mat: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    *,
    global_tokens: int | torch.Tensor | None = None,
    global_seqs: int | torch.Tensor | None = None,
    scale_factor: float | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss ``[B, T]`` to a scalar (verl ``agg_loss`` semantics).

    Modes:
        ``token-mean``: sum over all tokens / number of tokens (DAPO, Yu et al. 2025).
        ``seq-mean-token-sum``: mean over sequences of each sequence's token sum.
        ``seq-mean-token-mean``: mean over sequences of each sequence's token mean (GRPO paper).
        ``seq-mean-token-sum-norm``: ``seq-mean-token-sum / scale_factor`` with a constant
            ``scale_factor`` (default ``T = mask.shape[-1]``), as in Dr. GRPO (arXiv:2503.20783).
    Sequences with no valid token are left out of the sequence count.

    Denominators: without ``global_tokens``/``global_seqs`` they are this batch's own counts,
    i.e. the loss is a plain mean. With them, the numerator is still the sum over this batch's
    rows but the denominator is the global count, so summing the losses of all data-parallel
    shards and micro-batches gives exactly the full-batch loss (and the summed gradients the
    full-batch gradient) however the batch was split.
    """
    if mode == "token-mean":
        # clamp: an all-padding micro-batch gives 0, not 0/0
        denom = mask.sum().clamp(min=1) if global_tokens is None else global_tokens
        return masked_sum(loss_mat, mask) / denom
    if mode not in AGG_MODES:
        raise ValueError(f"unknown loss aggregation mode {mode!r}; valid modes: {', '.join(AGG_MODES)}")
    token_counts = mask.sum(dim=-1)  # [B]
    seq_losses = masked_sum(loss_mat, mask, dim=-1)  # [B] token sums
    if mode == "seq-mean-token-mean":
        seq_losses = seq_losses / (token_counts + 1e-8)
    seq_mask = (token_counts > 0).to(loss_mat.dtype)  # [B] excludes empty rows
    denom = seq_mask.sum().clamp(min=1) if global_seqs is None else global_seqs
    loss = masked_sum(seq_losses, seq_mask) / denom
    if mode == "seq-mean-token-sum-norm":
        loss = loss / (mask.shape[-1] if scale_factor is None else scale_factor)
    return loss


@register_policy_loss("vanilla")
def compute_policy_loss_vanilla(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    clip_c: float = 3.0,
    agg_mode: str = "token-mean",
    global_tokens: int | torch.Tensor | None = None,
    global_seqs: int | torch.Tensor | None = None,
    **mode_options: Any,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped PPO surrogate with dual clip; verl's ``compute_policy_loss_vanilla``.

    PPO (Schulman et al. 2017, arXiv:1707.06347, Eq. 7) with an asymmetric trust region:
    ``L = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))`` with ``r = exp(logprobs - old_logprobs)``.
    Clip-Higher (``clip_high > clip_low``) is DAPO's (arXiv:2503.14476). For ``A < 0`` the loss is
    further capped at ``-A * clip_c`` (dual-clip PPO, Ye et al. 2020, arXiv:1912.09729), so a
    very large ratio on a bad action cannot produce an unbounded update.

    Args:
        logprobs, old_logprobs, advantages, response_mask: ``[B, T]``.
        clip_c: dual-clip bound, must be > 1.
        agg_mode, global_tokens, global_seqs: see :func:`aggregate_loss`.
        mode_options: options of other losses; ``scale_factor`` is forwarded to
            :func:`aggregate_loss`, the rest is ignored so every loss takes the same call.

    Returns:
        ``(loss, metrics)`` with 0-d detached metrics over the masked tokens:
        ``pg_clipfrac`` (fraction where the PPO clip is active), ``pg_clipfrac_lower``
        (fraction where the dual clip is active) and ``ppo_kl`` (mean of ``old - new`` logprob).
    """
    if clip_c <= 1.0:
        raise ValueError(f"dual-clip bound clip_c must be > 1.0, got {clip_c}")
    log_ratio = (logprobs - old_logprobs).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)  # [B, T]
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    ppo_losses = torch.maximum(unclipped, clipped)  # pessimistic bound of PPO
    dual_bound = -advantages * clip_c
    dual_losses = torch.minimum(ppo_losses, dual_bound)  # only applied where A < 0
    negative = advantages < 0
    pg_losses = torch.where(negative, dual_losses, ppo_losses)  # [B, T]

    loss = aggregate_loss(
        pg_losses,
        response_mask,
        agg_mode,
        global_tokens=global_tokens,
        global_seqs=global_seqs,
        scale_factor=mode_options.get("scale_factor"),
    )
    with torch.no_grad():
        metrics = {
            "pg_clipfrac": masked_mean((clipped > unclipped).float(), response_mask),
            "pg_clipfrac_lower": masked_mean(((ppo_losses > dual_bound) & negative).float(), response_mask),
            "ppo_kl": masked_mean(-log_ratio, response_mask),
        }
    return loss, metrics


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of ``softmax(logits)`` over the last dim: ``logsumexp(z) - sum(softmax(z) * z)``.

    Args:
        logits: ``[..., V]``.

    Returns:
        ``[...]`` entropy in nats.
    """
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)
