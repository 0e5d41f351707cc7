"""Rewards by ``data_source``: built-in rule scorers, custom function loading, batch scoring."""

from __future__ import annotations

from spmd_rl.rewards.custom import load_custom_reward_function
from spmd_rl.rewards.default import SCORERS, UnknownDataSourceError, compute_score
from spmd_rl.rewards.scorer import RewardScorer, ScoreResult, build_scorer

__all__ = [
    "SCORERS",
    "RewardScorer",
    "ScoreResult",
    "UnknownDataSourceError",
    "build_scorer",
    "compute_score",
    "load_custom_reward_function",
]
