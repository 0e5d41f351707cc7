"""RL algorithm math as pure tensor functions: advantages, policy and value losses, KL, masked statistics.

Nothing here imports ``torch.distributed`` at module level; a data-parallel group, when a
statistic must be global, is passed in as an argument.
"""

from __future__ import annotations

from spmd_rl.algorithms.advantages import (
    ADVANTAGE_ESTIMATORS,
    compute_grpo_advantages,
    get_advantage_estimator,
    register_advantage_estimator,
)
from spmd_rl.algorithms.kl import (
    KL_KINDS,
    KL_PENALTIES,
    AdaptiveKLController,
    FixedKLController,
    apply_kl_penalty,
    build_kl_controller,
    kl_penalty,
)
from spmd_rl.algorithms.losses import (
    AGG_MODES,
    POLICY_LOSSES,
    aggregate_loss,
    compute_policy_loss_vanilla,
    entropy_from_logits,
    get_policy_loss,
    register_policy_loss,
    value_loss,
)
from spmd_rl.algorithms.masked import masked_mean, masked_sum, masked_var, masked_whiten

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "AGG_MODES",
    "KL_KINDS",
    "KL_PENALTIES",
    "POLICY_LOSSES",
    "AdaptiveKLController",
    "FixedKLController",
    "apply_kl_penalty",
    "build_kl_controller",
    "kl_penalty",
    "value_loss",
    "aggregate_loss",
    "compute_grpo_advantages",
    "compute_policy_loss_vanilla",
    "entropy_from_logits",
    "get_advantage_estimator",
    "get_policy_loss",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "register_advantage_estimator",
    "register_policy_loss",
]
