"""DAPO dynamic sampling (Yu et al. 2025, arXiv:2503.14476, Sec. 3.2).

A group whose n responses all got the same reward has zero advantage under any group-relative
estimator: it costs compute and contributes no gradient. Such groups are dropped and more
prompts are generated until the global batch is full again.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from spmd_rl.data.sampler import rank_share
from spmd_rl.trainer.batch import RolloutBatch, concat_batches


def informative_groups(scores: torch.Tensor, group_index: torch.Tensor) -> torch.Tensor:
    """``[B]`` bool: True for rows whose group's scores are not all equal (or that are alone,
    as verl keeps singleton groups)."""
    _, dense = torch.unique(group_index, return_inverse=True)
    num_groups = int(dense.max()) + 1
    lo = torch.full((num_groups,), float("inf")).scatter_reduce(0, dense, scores.float(), "amin")
    hi = torch.full((num_groups,), float("-inf")).scatter_reduce(0, dense, scores.float(), "amax")
    size = torch.zeros(num_groups).index_add(0, dense, torch.ones(len(scores)))
    keep = (hi > lo) | (size == 1)  # [G]
    return keep[dense]


def take_global_groups(batch: RolloutBatch, num_groups: int, mini_batch_size: int, dp_group, dp_rank: int,
                       dp_size: int, order: list | None = None) -> RolloutBatch:
    """This rank's equal share of the first ``num_groups`` groups of all ranks' batches.

    Ranks keep different numbers of groups after filtering, but every rank must run the same
    number of micro-batches (FSDP collectives), so the kept groups are pooled and dealt out
    again the way the sampler deals prompts: rank r gets its slice of every chunk of
    ``mini_batch_size`` groups (:func:`~spmd_rl.data.sampler.rank_share`).

    ``order`` holds a sort key per group of ``batch`` (in order): the pool is sorted by it
    before the first ``num_groups`` are taken. With (generation batch, position in the global
    batch), the groups trained on are the same at any dp size, as one rank would take them;
    without it, rank 0's groups come first."""
    pooled: list = [None] * dp_size
    dist.all_gather_object(pooled, (batch, order), group=dp_group)
    pieces = [(b, o) for b, o in pooled if len(b)]
    merged = concat_batches([b for b, _ in pieces])
    if order is not None:
        _, sizes = torch.unique_consecutive(merged.group_index, return_counts=True)
        starts = [0, *torch.cumsum(sizes, 0).tolist()]
        keys = [k for _, o in pieces for k in o]
        by_key = sorted(range(len(keys)), key=lambda g: keys[g])
        merged = merged.select([row for g in by_key for row in range(starts[g], starts[g + 1])])
    mine = torch.tensor(rank_share(num_groups, mini_batch_size, dp_rank, dp_size), dtype=torch.long)
    _, dense = torch.unique_consecutive(merged.group_index, return_inverse=True)
    rows = torch.isin(dense, mine).nonzero().squeeze(-1)
    return merged.select(rows.tolist())
