"""Policy losses, loss aggregation over tokens/sequences, and entropy.

Policy losses are selected by name from ``actor.policy_loss`` and share one signature::

    fn(logprobs, old_logprobs, advantages, response_mask,   # each [B, T]
       *, clip_low=0.2, clip_high=0.2, clip_c=3.0, agg_mode="token-mean",
       global_tokens=None, global_seqs=None, **mode_options) -> (loss 0-d, metrics)

``metrics`` maps a short name (``pg_clipfrac``...) to a detached 0-d tensor; the caller prefixes
and reduces them. ``global_tokens`` / ``global_seqs`` are counts over the whole data-parallel
batch, computed by the caller, so that every shard's loss can be summed (see ``aggregate_loss``).

Registered losses (verl ``core_algos`` semantics): ``vanilla`` (PPO + dual clip), ``gspo``,
``gpg``, ``clip_cov``, ``kl_cov``, ``cispo``. ``value_loss`` is the clipped critic loss of PPO.
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


def _aggregate(
    loss_mat: torch.Tensor,
    mask: torch.Tensor,
    agg_mode: str,
    global_tokens: int | torch.Tensor | None,
    global_seqs: int | torch.Tensor | None,
    mode_options: dict[str, Any],
) -> torch.Tensor:
    """:func:`aggregate_loss` with ``scale_factor`` taken from a loss's ``mode_options``."""
    return aggregate_loss(
        loss_mat,
        mask,
        agg_mode,
        global_tokens=global_tokens,
        global_seqs=global_seqs,
        scale_factor=mode_options.get("scale_factor"),
    )


def _zero_like(loss: torch.Tensor) -> torch.Tensor:
    """0-d zero metric on the loss's device, for metrics a loss does not define."""
    return torch.zeros((), dtype=loss.dtype, device=loss.device)


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

    loss = _aggregate(pg_losses, response_mask, agg_mode, global_tokens, global_seqs, mode_options)
    with torch.no_grad():
        metrics = {
            "pg_clipfrac": masked_mean((clipped > unclipped).float(), response_mask),
            "pg_clipfrac_lower": masked_mean(((ppo_losses > dual_bound) & negative).float(), response_mask),
            "ppo_kl": masked_mean(-log_ratio, response_mask),
        }
    return loss, metrics


@register_policy_loss("gspo")
def compute_policy_loss_gspo(
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
    """Group Sequence Policy Optimization (Zheng et al. 2025, arXiv:2507.18071); verl's ``compute_policy_loss_gspo``.

    The importance ratio is per sequence, the geometric mean of the token ratios:
    ``s_i = exp(mean_t(logprobs - old_logprobs))`` over the valid tokens of row ``i``. Each token
    uses ``s_i,t = sg(s_i) * pi_t / sg(pi_t)``: its value is ``s_i`` and its gradient is
    ``s_i * grad(log pi_t)``, which is GSPO's sequence gradient when the advantage is constant
    over the sequence (the paper's GSPO-token variant). Then the PPO clip
    ``max(-A s, -A clip(s, 1 - clip_low, 1 + clip_high))`` without dual clip (``clip_c`` unused).

    verl always aggregates GSPO with ``seq-mean-token-mean``; here ``agg_mode`` is honoured so the
    caller chooses (the configs pass ``seq-mean-token-mean``). The paper's clip ranges are much
    smaller than PPO's (3e-4 / 4e-4).

    Args:
        logprobs, old_logprobs, advantages, response_mask: ``[B, T]``.
        agg_mode, global_tokens, global_seqs, mode_options: as :func:`compute_policy_loss_vanilla`.

    Returns:
        ``(loss, metrics)``: ``pg_clipfrac`` (fraction of tokens where the clip is active),
        ``pg_clipfrac_lower`` (always 0) and ``ppo_kl`` (mean of ``old - new`` over tokens).
    """
    log_ratio = logprobs - old_logprobs  # [B, T]
    seq_lengths = response_mask.sum(dim=-1).clamp(min=1)  # [B]; clamp: empty rows give 0, not 0/0
    seq_log_ratio = masked_sum(log_ratio, response_mask, dim=-1) / seq_lengths  # [B] log s_i
    # value = log s_i, gradient = grad(log pi_t); the order keeps log s_i exact (lp - lp == 0)
    token_log_ratio = logprobs - logprobs.detach() + seq_log_ratio.detach().unsqueeze(-1)
    ratio = torch.exp(token_log_ratio.clamp(max=10.0))  # clamp: exp overflow on long divergent rows
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    pg_losses = torch.maximum(unclipped, clipped)  # [B, T]

    loss = _aggregate(pg_losses, response_mask, agg_mode, global_tokens, global_seqs, mode_options)
    with torch.no_grad():
        metrics = {
            "pg_clipfrac": masked_mean((clipped > unclipped).float(), response_mask),
            "pg_clipfrac_lower": _zero_like(loss),
            "ppo_kl": masked_mean(-log_ratio, response_mask),
        }
    return loss, metrics


@register_policy_loss("gpg")
def compute_policy_loss_gpg(
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
    """Group Policy Gradient (Chu et al. 2025, arXiv:2504.02546); verl's ``compute_policy_loss_gpg``.

    Plain REINFORCE on the current policy, ``L = -A * logprobs``: no importance ratio and no
    clip, so ``old_logprobs`` and the clip arguments are unused (GPG trains fully on-policy).

    Args:
        logprobs, advantages, response_mask: ``[B, T]``.
        agg_mode, global_tokens, global_seqs, mode_options: as :func:`compute_policy_loss_vanilla`.

    Returns:
        ``(loss, metrics)``; the three metrics are 0 (nothing is clipped, no ratio is formed).
    """
    pg_losses = -logprobs * advantages  # [B, T]
    loss = _aggregate(pg_losses, response_mask, agg_mode, global_tokens, global_seqs, mode_options)
    zero = _zero_like(loss)
    return loss, {"pg_clipfrac": zero, "pg_clipfrac_lower": zero.clone(), "ppo_kl": zero.clone()}


@register_policy_loss("clip_cov")
def compute_policy_loss_clip_cov(
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
    """Clip-Cov (Cui et al. 2025, arXiv:2505.22617, Sec. 4); verl's ``compute_policy_loss_clip_cov``.

    The paper ties entropy collapse to tokens whose centred advantage and centred logprob have
    a large positive product ``cov = (A - mean A) (logprob - mean logprob)`` (means over this
    micro-batch's valid tokens). Among valid tokens not already clipped by PPO whose ``cov`` lies
    strictly in ``(clip_cov_lb, clip_cov_ub)``, ``max(int(clip_cov_ratio * n_tokens), 1)`` are
    picked uniformly at random and their loss is multiplied by 0, which removes their gradient.
    All other tokens get the PPO clip ``max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))``;
    as in verl there is no dual clip (``clip_c`` unused) and no log-ratio clamp.

    The selection depends on the micro-batch (its means and its token count), so unlike the
    other losses this one is not invariant to how a batch is split.

    Args:
        logprobs, old_logprobs, advantages, response_mask: ``[B, T]``.
        agg_mode, global_tokens, global_seqs: see :func:`aggregate_loss`.
        mode_options: ``clip_cov_ratio`` (0.0002, must be > 0), ``clip_cov_lb`` (1.0),
            ``clip_cov_ub`` (5.0), ``generator`` (``torch.Generator`` for the random pick;
            None = the global RNG, as verl), ``scale_factor``; others are ignored.

    Returns:
        ``(loss, metrics)``: ``pg_clipfrac`` (fraction of tokens whose loss was zeroed),
        ``pg_clipfrac_lower`` (0) and ``ppo_kl`` (mean of ``old - new``).
    """
    clip_cov_ratio = mode_options.get("clip_cov_ratio", 0.0002)
    clip_cov_lb = mode_options.get("clip_cov_lb", 1.0)
    clip_cov_ub = mode_options.get("clip_cov_ub", 5.0)
    generator: torch.Generator | None = mode_options.get("generator")
    if clip_cov_ratio <= 0:
        raise ValueError(f"clip_cov_ratio must be > 0, got {clip_cov_ratio}")

    log_ratio = logprobs - old_logprobs  # [B, T]
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    valid = response_mask > 0

    with torch.no_grad():  # the selection is a constant of the loss
        clip_by_ppo = (clipped > unclipped) & valid
        cov = (advantages - masked_mean(advantages, response_mask)) * (
            logprobs - masked_mean(logprobs, response_mask)
        )  # [B, T]
        # padding and tokens PPO already clipped can never be candidates
        cov = cov.masked_fill(~valid | clip_by_ppo, -torch.inf)
        candidates = torch.nonzero((cov > clip_cov_lb) & (cov < clip_cov_ub) & valid)  # [N, 2] (row, col)
        clip_num = max(int(clip_cov_ratio * response_mask.sum().item()), 1)
        keep = torch.ones_like(advantages)  # verl's ``corr``
        if len(candidates) > 0:
            perm_device = generator.device if generator is not None else torch.device("cpu")
            perm = torch.randperm(len(candidates), generator=generator, device=perm_device)
            picked = candidates[perm[: min(clip_num, len(candidates))].to(candidates.device)]
            keep[picked[:, 0], picked[:, 1]] = 0.0

    pg_losses = torch.maximum(unclipped, clipped) * keep  # [B, T]
    loss = _aggregate(pg_losses, response_mask, agg_mode, global_tokens, global_seqs, mode_options)
    with torch.no_grad():
        metrics = {
            "pg_clipfrac": masked_mean((keep == 0).float(), response_mask),
            "pg_clipfrac_lower": _zero_like(loss),
            "ppo_kl": masked_mean(-log_ratio, response_mask),
        }
    return loss, metrics


@register_policy_loss("kl_cov")
def compute_policy_loss_kl_cov(
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
    """KL-Cov (Cui et al. 2025, arXiv:2505.22617, Sec. 4); verl's ``compute_policy_loss_kl_cov``.

    Every token gets the unclipped surrogate ``-A r`` (no PPO clip: the KL term is the trust
    region). The ``max(1, int(kl_cov_ratio * n_tokens))`` valid tokens with the largest
    ``cov = (A - mean A) (logprob - mean logprob)`` (plain means over the valid tokens of this
    micro-batch) get ``-A r + ppo_kl_coef * |log r|`` instead, which pulls exactly the tokens
    that drive entropy collapse back towards the old policy. Like verl, no log-ratio clamp.
    The selection depends on the micro-batch, so the loss is not split-invariant.

    Args:
        logprobs, old_logprobs, advantages, response_mask: ``[B, T]``.
        agg_mode, global_tokens, global_seqs: see :func:`aggregate_loss`.
        mode_options: ``kl_cov_ratio`` (0.0002, must be > 0), ``ppo_kl_coef`` (1.0),
            ``scale_factor``; others are ignored. Clip arguments are unused.

    Returns:
        ``(loss, metrics)``: ``pg_clipfrac`` and ``pg_clipfrac_lower`` are 0; ``ppo_kl`` is the
        mean of ``|log r|`` over valid tokens, as verl reports it for this loss.
    """
    kl_cov_ratio = mode_options.get("kl_cov_ratio", 0.0002)
    ppo_kl_coef = mode_options.get("ppo_kl_coef", 1.0)
    if kl_cov_ratio <= 0:
        raise ValueError(f"kl_cov_ratio must be > 0, got {kl_cov_ratio}")

    log_ratio = logprobs - old_logprobs  # [B, T]
    abs_kl = log_ratio.abs()
    ratio = torch.exp(log_ratio)
    pg_losses = -advantages * ratio
    kl_losses = pg_losses + ppo_kl_coef * abs_kl

    with torch.no_grad():  # the selection is a constant of the loss
        valid_idx = torch.nonzero(response_mask.reshape(-1) > 0).squeeze(-1)  # [N] flat positions
        selected = torch.zeros(response_mask.numel(), dtype=torch.bool, device=response_mask.device)
        if len(valid_idx) > 0:
            adv = advantages.reshape(-1)[valid_idx]
            lp = logprobs.reshape(-1)[valid_idx]
            cov = (adv - adv.mean()) * (lp - lp.mean())  # [N]
            # min(): a ratio > 1 would ask for more tokens than there are
            k = min(max(1, int(len(cov) * kl_cov_ratio)), len(cov))
            selected[valid_idx[torch.topk(cov, k, largest=True).indices]] = True
        selected = selected.view_as(response_mask)

    pg_losses = torch.where(selected, kl_losses, pg_losses)  # [B, T]
    loss = _aggregate(pg_losses, response_mask, agg_mode, global_tokens, global_seqs, mode_options)
    with torch.no_grad():
        metrics = {
            "pg_clipfrac": _zero_like(loss),
            "pg_clipfrac_lower": _zero_like(loss),
            "ppo_kl": masked_mean(abs_kl, response_mask),
        }
    return loss, metrics


@register_policy_loss("cispo")
def compute_policy_loss_cispo(
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
    """Clipped IS-weight Policy Optimization (MiniMax-M1, arXiv:2506.13585, Eq. 4-5); verl's ``cispo``.

    ``L = -sg(clip(r, 1 - clip_low, 1 + clip_high)) * A * logprobs``. PPO's clip drops the
    gradient of tokens outside the trust region; CISPO clips the importance weight instead and
    stops its gradient, so every token keeps a REINFORCE gradient ``-w A grad(logprobs)``, merely
    reweighted. The paper effectively has no lower bound: set ``clip_low`` large (e.g. 1.0, so
    ``1 - clip_low <= 0``) and tune ``clip_high``; the defaults 0.2/0.2 are verl's shared PPO ones.
    No dual clip (``clip_c`` unused).

    Args:
        logprobs, old_logprobs, advantages, response_mask: ``[B, T]``.
        agg_mode, global_tokens, global_seqs, mode_options: as :func:`compute_policy_loss_vanilla`.

    Returns:
        ``(loss, metrics)``: ``pg_clipfrac`` (fraction of tokens whose weight was clipped),
        ``pg_clipfrac_lower`` (0) and ``ppo_kl`` (mean of ``old - new``, clamped as the ratio).
    """
    log_ratio = (logprobs - old_logprobs).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)  # [B, T]
    ratio = torch.exp(log_ratio)
    weight = ratio.clamp(1.0 - clip_low, 1.0 + clip_high).detach()  # sg(): gradient only via logprobs
    pg_losses = -weight * advantages * logprobs  # [B, T]

    loss = _aggregate(pg_losses, response_mask, agg_mode, global_tokens, global_seqs, mode_options)
    with torch.no_grad():
        metrics = {
            "pg_clipfrac": masked_mean((ratio != weight).float(), response_mask),
            "pg_clipfrac_lower": _zero_like(loss),
            "ppo_kl": masked_mean(-log_ratio, response_mask),
        }
    return loss, metrics


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip: float = 0.5,
    agg_mode: str = "token-mean",
    global_tokens: int | torch.Tensor | None = None,
    global_seqs: int | torch.Tensor | None = None,
    scale_factor: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss of PPO implementations (see arXiv:2005.12729); verl's ``compute_value_loss``.

    ``v_clip = old + clamp(v - old, -clip, clip)`` keeps the critic in a trust region around the
    values used for the advantages; the pessimistic ``max`` of the two squared errors is taken:
    ``L = 0.5 * agg(max((v - R)^2, (v_clip - R)^2))``.

    Args:
        values: ``[B, T]`` current critic predictions.
        old_values: ``[B, T]`` predictions at rollout time.
        returns: ``[B, T]`` regression targets.
        response_mask: ``[B, T]``.
        clip: value clip range.
        agg_mode, global_tokens, global_seqs, scale_factor: see :func:`aggregate_loss`.

    Returns:
        ``(loss, metrics)``: ``vf_clipfrac`` (fraction of tokens where the clipped error is the
        larger one) and ``vpred_mean`` (mean prediction), detached 0-d tensors.
    """
    clipped_values = old_values + (values - old_values).clamp(-clip, clip)
    unclipped_err = (values - returns) ** 2
    clipped_err = (clipped_values - returns) ** 2
    loss_mat = torch.maximum(unclipped_err, clipped_err)  # [B, T]
    loss = 0.5 * aggregate_loss(
        loss_mat,
        response_mask,
        agg_mode,
        global_tokens=global_tokens,
        global_seqs=global_seqs,
        scale_factor=scale_factor,
    )
    with torch.no_grad():
        metrics = {
            "vf_clipfrac": masked_mean((clipped_err > unclipped_err).float(), response_mask),
            "vpred_mean": masked_mean(values, response_mask),
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
