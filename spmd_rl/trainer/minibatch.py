"""Splitting a rollout batch into PPO mini-batches (one optimizer step each) and micro-batches
(one forward/backward each), and the global counts that make the loss independent of the split."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from spmd_rl.distributed.collectives import all_reduce_sum
from spmd_rl.trainer.batch import RolloutBatch


def mini_batches(batch: RolloutBatch, mini_batch_size: int, epochs: int) -> Iterator[RolloutBatch]:
    """``epochs`` passes over consecutive slices of ``mini_batch_size`` rows.

    Rows are grouped by prompt and ``mini_batch_size`` is a multiple of ``rollout.n``, so a
    group never straddles two mini-batches."""
    for _ in range(epochs):
        for start in range(0, len(batch), mini_batch_size):
            yield batch.select(range(start, min(start + mini_batch_size, len(batch))))


def micro_batches(mini: RolloutBatch, micro_batch_size: int) -> Iterator[RolloutBatch]:
    for start in range(0, len(mini), micro_batch_size):
        yield mini.select(range(start, min(start + micro_batch_size, len(mini))))


def cat_padded(chunks: list[torch.Tensor], width: int) -> torch.Tensor:
    """Concatenate per-micro-batch ``[b, t_i]`` results (each trimmed to its own longest
    response) into one ``[B, width]`` CPU tensor, zero-padded on the right."""
    return torch.cat([torch.nn.functional.pad(x.cpu(), (0, width - x.shape[1])) for x in chunks])


def global_counts(mini: RolloutBatch, dp_group, device="cpu") -> tuple[float, float]:
    """(response tokens, non-empty responses) of the mini-batch over all dp ranks, as
    :func:`spmd_rl.algorithms.losses.aggregate_loss` counts them."""
    tokens = all_reduce_sum(mini.response_mask.sum().item(), dp_group, device)
    seqs = all_reduce_sum(int((mini.response_mask.sum(-1) > 0).sum()), dp_group, device)
    return tokens, seqs
