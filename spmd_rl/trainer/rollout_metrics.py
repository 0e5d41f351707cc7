"""Statistics of a rollout batch in verl's metric names (rank-local; the trainer reduces over dp)."""

from __future__ import annotations

from spmd_rl.trainer.batch import RolloutBatch


def compute_rollout_metrics(batch: RolloutBatch) -> dict[str, float]:
    mask = batch.response_mask.bool()
    lengths = batch.response_mask.sum(-1)
    prompt_lengths = [float(len(p)) for p in batch.prompt_ids]
    # Engine vs trainer logprobs of the same tokens: nonzero only through numerics or a stale sync.
    diff = (batch.rollout_logprobs - batch.old_logprobs).abs()[mask]
    adv = batch.advantages[mask]
    sequence_rewards = batch.token_rewards.sum(-1)
    return {
        "critic/score/mean": batch.scores.mean().item(),
        "critic/score/max": batch.scores.max().item(),
        "critic/score/min": batch.scores.min().item(),
        "critic/rewards/mean": sequence_rewards.mean().item(),
        "response_length/mean": lengths.mean().item(),
        "response_length/max": lengths.max().item(),
        "response_length/min": lengths.min().item(),
        "response_length/clip_ratio": sum(r == "length" for r in batch.finish_reasons) / len(batch),
        "prompt_length/mean": sum(prompt_lengths) / len(prompt_lengths),
        "rollout/logprob_diff_max": diff.max().item(),
        "rollout/logprob_diff_mean": diff.mean().item(),
        "critic/advantages/mean": adv.mean().item(),
        "critic/advantages/max": adv.max().item(),
        "critic/advantages/min": adv.min().item(),
    }
