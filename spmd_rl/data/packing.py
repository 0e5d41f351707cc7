"""Padding-free packing: many sequences as one row, and token-budget grouping.

Packed attention (varlen / ``cu_seqlens``) keeps sequences from attending to each other, and
position ids restart at 0 for each, so a packed row computes the same as a padded batch without
spending compute on padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class PackedBatch:
    """Sequences concatenated into one row of N tokens."""

    input_ids: Tensor  # [1, N] int64
    position_ids: Tensor  # [1, N] int64, restarting at 0 per sequence
    cu_seqlens: Tensor  # [S+1] int32, sequence s spans [cu_seqlens[s], cu_seqlens[s+1])

    @property
    def seqlens(self) -> list[int]:
        """Length of each packed sequence."""
        return self.cu_seqlens.diff().tolist()


def pack_sequences(seqs: list[list[int]]) -> PackedBatch:
    """Concatenate token sequences into a :class:`PackedBatch`."""
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.int64)
    cu_seqlens = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.cumsum(lengths, 0)
    input_ids = torch.tensor([t for s in seqs for t in s], dtype=torch.int64)
    # Position of each token within its sequence: global position minus its sequence's start.
    starts = torch.repeat_interleave(cu_seqlens[:-1].long(), lengths)
    position_ids = torch.arange(input_ids.numel(), dtype=torch.int64) - starts
    return PackedBatch(input_ids=input_ids[None], position_ids=position_ids[None], cu_seqlens=cu_seqlens)


def split_by_token_budget(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Greedy, order-preserving groups of indices whose lengths sum to at most ``max_tokens``.

    A group is closed as soon as the next sequence would overflow it; a sequence longer than the
    budget on its own gets a group to itself (the caller decides whether that is acceptable).
    """
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    groups: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i, n in enumerate(lengths):
        if current and used + n > max_tokens:
            groups.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        groups.append(current)
    return groups
