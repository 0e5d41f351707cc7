"""KL penalty between the policy and a reference policy: per-token estimators and coefficient control.

Estimators follow J. Schulman, "Approximating KL divergence" (2020, http://joschu.net/blog/kl-approx.html),
with verl's names (``verl.trainer.ppo.core_algos.kl_penalty``). With ``x = logprobs - ref_logprobs``
of a token sampled from the policy:

    ``kl`` / ``k1``: ``x`` (unbiased for KL(pi || ref), high variance, can be negative)
    ``abs``: ``|x|``
    ``mse`` / ``k2``: ``x^2 / 2`` (biased, but its gradient is the gradient of KL)
    ``low_var_kl`` / ``k3``: ``exp(-x) + x - 1`` (unbiased, non-negative, low variance)

A ``+`` suffix (``k1+``, ``k3+``, ``low_var_kl+``...) keeps the value of the estimator but takes the
gradient of ``k2`` (straight-through), because the expected gradient of k1/k3 is not the gradient
of the KL while that of k2 is.

The coefficient of the in-reward penalty comes from a controller: fixed, or adaptive as in
Ziegler et al. 2019 (arXiv:1909.08593, Sec. 2.2).
"""

from __future__ import annotations

from typing import Any

import torch

from spmd_rl.algorithms.masked import masked_mean

# base estimators; each may also be given with a "+" suffix
KL_PENALTIES = ("kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3")
KL_KINDS = KL_PENALTIES + tuple(f"{name}+" for name in KL_PENALTIES)

KL_CONTROLLERS = ("fixed", "adaptive")


def _unknown_kind(kind: str) -> ValueError:
    valid = ", ".join(KL_KINDS)
    if kind.rstrip("+") == "full":
        return ValueError(f"KL penalty {kind!r} (exact KL over the vocabulary) is not supported; valid kinds: {valid}")
    return ValueError(f"unknown KL penalty {kind!r}; valid kinds: {valid}")


def _kl_forward(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, base: str) -> torch.Tensor:
    """Value of a base estimator (no ``+``), ``[B, T]``."""
    if base in ("kl", "k1"):
        return logprobs - ref_logprobs
    if base == "abs":
        return (logprobs - ref_logprobs).abs()
    if base in ("mse", "k2"):
        return 0.5 * (logprobs - ref_logprobs).square()
    # low_var_kl / k3: with log_r = log(ref / pi), r - 1 - log r >= 0
    log_r = (ref_logprobs - logprobs).clamp(-20.0, 20.0)  # exp() overflow guard
    # clamp: a single token far from the reference would otherwise dominate the loss
    return (torch.exp(log_r) - log_r - 1.0).clamp(-10.0, 10.0)


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token KL estimate of KL(pi || ref) from sampled-token logprobs.

    Args:
        logprobs: ``[B, T]`` logprobs of the sampled tokens under the policy.
        ref_logprobs: ``[B, T]`` logprobs of the same tokens under the reference policy.
        kind: one of :data:`KL_KINDS` (see the module docstring); ``full`` is not supported
            because it needs the whole vocabulary distribution, not sampled-token logprobs.

    Returns:
        ``[B, T]`` estimate; not masked (the caller masks).
    """
    if kind not in KL_KINDS:
        raise _unknown_kind(kind)
    base = kind.rstrip("+")
    value = _kl_forward(logprobs, ref_logprobs, base)
    if not kind.endswith("+") or base in ("mse", "k2"):
        return value
    # straight-through: forward = base estimator, backward = gradient of k2
    k2 = 0.5 * (logprobs - ref_logprobs).square()
    return k2 - k2.detach() + value.detach()


def apply_kl_penalty(
    token_scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    kl_coef: float,
    kind: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """In-reward KL penalty: ``rewards = scores - kl_coef * kl * mask`` (verl's ``apply_kl_penalty``).

    Args:
        token_scores: ``[B, T]`` task reward per token (outcome score on the last token).
        logprobs: ``[B, T]`` rollout-time policy logprobs (verl passes ``old_log_probs``).
        ref_logprobs: ``[B, T]`` reference logprobs.
        response_mask: ``[B, T]``.
        kl_coef: penalty coefficient, e.g. a controller's ``.value``.
        kind: KL estimator, see :func:`kl_penalty`.

    Returns:
        ``(token_rewards [B, T], mean_kl 0-d)``. ``mean_kl`` is the mean over the ``B`` rows of
        each row's masked mean KL; as in verl an all-padding row counts with KL 0. It is the
        ``current_kl`` for :meth:`AdaptiveKLController.update`.
    """
    kl = kl_penalty(logprobs, ref_logprobs, kind)
    # where(): NaN/inf logprobs on padding must not reach the rewards (0 * nan = nan)
    kl = torch.where(response_mask.bool(), kl, torch.zeros((), dtype=kl.dtype, device=kl.device))
    token_rewards = token_scores - kl_coef * kl
    mean_kl = masked_mean(kl, response_mask, dim=-1).mean()
    return token_rewards, mean_kl


class FixedKLController:
    """Constant KL coefficient; ``update`` is a no-op."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> None:
        """No-op: the coefficient is fixed (arguments kept for a common interface)."""

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient of Ziegler et al. 2019 (arXiv:1909.08593, Sec. 2.2).

    After each batch: ``e = clip(current_kl / target_kl - 1, -0.2, 0.2)`` and
    ``value *= 1 + e * n_steps / horizon``, i.e. a proportional controller that moves the
    coefficient by at most 20% per ``horizon`` steps towards the KL target.
    """

    def __init__(self, init_kl_coef: float, target_kl: float, horizon: float):
        if horizon <= 0:
            raise ValueError(f"adaptive KL controller: horizon must be > 0, got {horizon}")
        if target_kl <= 0:
            raise ValueError(f"adaptive KL controller: target_kl must be > 0, got {target_kl}")
        self.value = float(init_kl_coef)
        self.target = float(target_kl)
        self.horizon = float(horizon)

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> None:
        """Move ``value`` towards the target after a batch of ``n_steps`` samples/steps."""
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


def build_kl_controller(
    kind: str, kl_coef: float, target_kl: float = 0.1, horizon: float = 10000
) -> FixedKLController | AdaptiveKLController:
    """Controller named by ``algorithm.kl_ctrl.type``: ``fixed`` or ``adaptive``.

    ``target_kl`` and ``horizon`` are used by ``adaptive`` only (defaults are verl's).
    """
    if kind == "fixed":
        return FixedKLController(kl_coef)
    if kind == "adaptive":
        return AdaptiveKLController(kl_coef, target_kl, horizon)
    raise ValueError(f"unknown KL controller {kind!r}; valid kinds: {', '.join(KL_CONTROLLERS)}")
