"""Rollout metrics: means over sequences and over response tokens, max / min, on a known batch."""

import pytest
import torch

from spmd_rl.trainer.batch import RolloutBatch
from spmd_rl.trainer.rollout_metrics import compute_rollout_metrics


def test_means_are_over_sequences_and_tokens_of_the_batch():
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])  # 3 + 1 response tokens
    batch = RolloutBatch(prompt_ids=[[1, 2], [3, 4, 5, 6]], response_ids=[[7, 8, 9], [7]],
                         group_index=torch.tensor([0, 0]), response_mask=mask,
                         rollout_logprobs=torch.tensor([[-1.0, -1.0, -1.0], [-2.0, 0.0, 0.0]]),
                         finish_reasons=["length", "stop"])
    batch.old_logprobs = torch.tensor([[-1.0, -1.5, -1.0], [-2.5, 9.0, 9.0]])  # padding must not count
    batch.advantages = torch.tensor([[1.0, 2.0, 3.0], [6.0, 100.0, 100.0]])
    batch.scores = torch.tensor([1.0, 0.0])
    batch.token_rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, 0.0, 0.0]])
    m = compute_rollout_metrics(batch)
    assert m["critic/advantages/mean"] == pytest.approx(3.0)  # (1 + 2 + 3 + 6) / 4 tokens, not a mean of row means
    assert (m["critic/advantages/max"], m["critic/advantages/min"]) == (6.0, 1.0)
    assert m["rollout/logprob_diff_mean"] == pytest.approx(0.25) and m["rollout/logprob_diff_max"] == 0.5
    assert m["critic/score/mean"] == 0.5 and m["critic/rewards/mean"] == pytest.approx(0.75)
    assert m["response_length/mean"] == 2.0 and m["response_length/clip_ratio"] == 0.5
    assert m["prompt_length/mean"] == 3.0
    assert (m["response_length/max"], m["response_length/min"]) == (3.0, 1.0)
