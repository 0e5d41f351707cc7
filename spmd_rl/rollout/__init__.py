"""Generation inside the training process: the :class:`RolloutEngine` protocol, its engines
(``native``, ``hf``), sampling, and weight sync from the trainer's layout."""

from spmd_rl.rollout.engine import RolloutEngine, build_engine
from spmd_rl.rollout.types import Completion, SamplingParams
from spmd_rl.rollout.weight_sync import iter_full_tensors, sync_weights

__all__ = [
    "Completion",
    "RolloutEngine",
    "SamplingParams",
    "build_engine",
    "iter_full_tensors",
    "sync_weights",
]
