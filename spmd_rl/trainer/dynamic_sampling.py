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
                       dp_size: int) -> RolloutBatch:
    """This rank's equal share of the first ``num_groups`` groups of all ranks' batches.

    Ranks keep different numbers of groups after filtering, but every rank must run the same
    number of micro-batches (FSDP collectives), so the kept groups are pooled and dealt out
    again the way the sampler deals prompts: rank r gets its slice of every chunk of
    ``mini_batch_size`` groups (:func:`~spmd_rl.data.sampler.rank_share`)."""
    pooled: list[RolloutBatch | None] = [None] * dp_size
    dist.all_gather_object(pooled, batch, group=dp_group)
    merged = concat_batches([b for b in pooled if len(b)])
    mine = torch.tensor(rank_share(num_groups, mini_batch_size, dp_rank, dp_size), dtype=torch.long)
    _, dense = torch.unique_consecutive(merged.group_index, return_inverse=True)
    rows = torch.isin(dense, mine).nonzero().squeeze(-1)
    return merged.select(rows.tolist())
