"""Statistics of a rollout batch in verl's metric names.

Means are over the whole batch of every dp rank (sums and counts are all-reduced over
``dp_group``), so they do not depend on how many ranks share the batch or on how balancing
spread the sequences; max / min are rank-local and the trainer's ``reduce_metrics`` takes the
max / min over ranks (and leaves the means, equal on every rank, as they are)."""

from __future__ import annotations

import torch

from spmd_rl.algorithms.masked import all_reduce_sum
from spmd_rl.trainer.batch import RolloutBatch


def compute_rollout_metrics(batch: RolloutBatch, dp_group=None) -> dict[str, float]:
    mask = batch.response_mask.bool()
    lengths = batch.response_mask.sum(-1)
    prompt_lengths = torch.tensor([float(len(p)) for p in batch.prompt_ids])
    # Engine vs trainer logprobs of the same tokens: nonzero only through numerics or a stale sync.
    diff = (batch.rollout_logprobs - batch.old_logprobs).abs()[mask]
    adv = batch.advantages[mask]
    sequence_rewards = batch.token_rewards.sum(-1)
    clipped = sum(r == "length" for r in batch.finish_reasons)
    per_sequence = {"critic/score/mean": batch.scores.sum(), "critic/rewards/mean": sequence_rewards.sum(),
                    "response_length/mean": lengths.sum(), "response_length/clip_ratio": clipped,
                    "prompt_length/mean": prompt_lengths.sum()}
    per_token = {"rollout/logprob_diff_mean": diff.sum(), "critic/advantages/mean": adv.sum()}
    sums = torch.tensor([*map(float, per_sequence.values()), *map(float, per_token.values()),
                         float(len(batch)), float(mask.sum())], dtype=torch.float64)
    *totals, sequences, tokens = all_reduce_sum(sums, dp_group).tolist()
    means = dict(zip([*per_sequence, *per_token], totals))
    for key in per_sequence:
        means[key] /= sequences
    for key in per_token:
        means[key] /= max(tokens, 1.0)
    return {
        **means,
        "critic/score/max": batch.scores.max().item(),
        "critic/score/min": batch.scores.min().item(),
        "response_length/max": lengths.max().item(),
        "response_length/min": lengths.min().item(),
        "rollout/logprob_diff_max": diff.max().item(),
        "critic/advantages/max": adv.max().item(),
        "critic/advantages/min": adv.min().item(),
    }
