"""Splitting a rollout batch into PPO mini-batches (one optimizer step each) and micro-batches
(one forward/backward each), the global counts that make the loss independent of the split, and
the token-load balancing of whole groups over dp ranks.

Micro-batches hold either a fixed number of sequences or, with a token budget (dynamic batch
size), as many sequences as fit in ``max_tokens`` prompt+response tokens
(:func:`~spmd_rl.data.batching.token_budget_micro_batches`). Either way every dp rank runs the
same number of micro-batches: under FSDP2 each micro-batch's forward all-gathers the sharded
parameters and its backward reduce-scatters the gradients, and collectives are matched by order,
so a rank with one micro-batch more would pair its all-gather with another rank's next
collective (gloo aborts with "collective mismatch", nccl hangs). The ranks agree on the largest
count with one all-reduce per mini-batch and split their own micro-batches up to it.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from spmd_rl.data.batching import (balance_ratio, balanced_assignment, split_micro_batches,
                                   token_budget_micro_batches)
from spmd_rl.distributed.collectives import all_reduce_sum
from spmd_rl.trainer.batch import RolloutBatch, concat_batches


def layout_mini_batch_size(actor_mini_batch_size: int, critic_mini_batch_size: int = 0) -> int:
    """Prompts per chunk of the data layout over dp ranks (rank r holds the r-th slice of every
    chunk, :func:`~spmd_rl.data.sampler.rank_share`).

    A rank cuts its rows into mini-batches locally, so a mini-batch is the same set of prompts at
    any dp size only when it is made of whole chunks. The actor's and the critic's mini-batches
    both are when the chunk is their greatest common divisor (0: the critic has none of its own).
    """
    return math.gcd(actor_mini_batch_size, critic_mini_batch_size or actor_mini_batch_size)


def mini_batches(batch: RolloutBatch, mini_batch_size: int, epochs: int):
    """``epochs`` passes over consecutive slices of ``mini_batch_size`` rows.

    Rows are grouped by prompt and ``mini_batch_size`` is a multiple of ``rollout.n``, so a
    group never straddles two mini-batches."""
    for _ in range(epochs):
        for start in range(0, len(batch), mini_batch_size):
            yield batch.select(range(start, min(start + mini_batch_size, len(batch))))


def sequence_lengths(batch: RolloutBatch) -> list[int]:
    """``[B]`` prompt+response tokens of each row: what a forward pass costs."""
    return [len(p) + len(r) for p, r in zip(batch.prompt_ids, batch.response_ids)]


def micro_batch_rows(batch: RolloutBatch, micro_batch_size: int, max_tokens: int = 0, dp_group=None, *,
                     padded: bool = False) -> list[list[int]]:
    """Row indices of each micro-batch of ``batch``.

    ``max_tokens <= 0``: consecutive slices of ``micro_batch_size`` rows (the same count on every
    rank, which holds the same number of rows). ``max_tokens > 0``: token-budget micro-batches,
    then split up to the largest count over ``dp_group`` (one all-reduce; see the module doc).
    Splitting never adds tokens to a micro-batch, so the budget still holds, except for a single
    sequence longer than it, which is always alone. ``padded``: the budget counts the rows
    right-padded to each micro-batch's longest (forwards without padding-free packing)."""
    if max_tokens <= 0:
        return [list(range(s, min(s + micro_batch_size, len(batch)))) for s in range(0, len(batch), micro_batch_size)]
    lengths = sequence_lengths(batch)
    rows = token_budget_micro_batches(lengths, max_tokens, padded=padded)
    return split_micro_batches(rows, lengths, _max_over_ranks(len(rows), dp_group))


def micro_batches(batch: RolloutBatch, micro_batch_size: int, max_tokens: int = 0, dp_group=None, *,
                  padded: bool = False) -> list[tuple[list[int], RolloutBatch]]:
    """``(rows, sub-batch)`` of each micro-batch; see :func:`micro_batch_rows`."""
    return [(rows, batch.select(rows))
            for rows in micro_batch_rows(batch, micro_batch_size, max_tokens, dp_group, padded=padded)]


def _max_over_ranks(value: int, group) -> int:
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return int(t.item())


def cat_padded(chunks: list[torch.Tensor], width: int) -> torch.Tensor:
    """Concatenate per-micro-batch ``[b, t_i]`` results (each trimmed to its own longest
    response) into one ``[B, width]`` CPU tensor, zero-padded on the right."""
    return torch.cat([torch.nn.functional.pad(x.cpu(), (0, width - x.shape[1])) for x in chunks])


def scatter_rows(chunks: list[torch.Tensor], rows: list[list[int]], num_rows: int, width: int) -> torch.Tensor:
    """Per-micro-batch ``[b_i, t_i]`` results back into the batch's row order: ``[num_rows, width]``
    on the CPU, zero-padded on the right (token-budget micro-batches are not consecutive rows)."""
    out = torch.zeros(num_rows, width, dtype=chunks[0].dtype if chunks else torch.float32)
    for chunk, index in zip(chunks, rows):
        out[index, : chunk.shape[1]] = chunk.cpu()
    return out


def global_counts(mini: RolloutBatch, dp_group, device="cpu") -> tuple[float, float]:
    """(response tokens, non-empty responses) of the mini-batch over all dp ranks, as
    :func:`spmd_rl.algorithms.losses.aggregate_loss` counts them."""
    tokens = all_reduce_sum(mini.response_mask.sum().item(), dp_group, device)
    seqs = all_reduce_sum(int((mini.response_mask.sum(-1) > 0).sum()), dp_group, device)
    return tokens, seqs


def _groups_of_chunks(batch: RolloutBatch, chunk_rows: int) -> list[list[list[int]]]:
    """``[chunk][group] -> rows``: the groups (rows sharing a ``group_index``) of every slice of
    ``chunk_rows`` rows, in order of first appearance."""
    chunks, seen = [], set()
    gids = batch.group_index.tolist()
    for start in range(0, len(batch), chunk_rows):
        groups: dict[int, list[int]] = {}
        for row in range(start, min(start + chunk_rows, len(batch))):
            groups.setdefault(gids[row], []).append(row)
        if seen & groups.keys():
            raise ValueError(f"a group straddles two slices of {chunk_rows} rows: the mini-batch size in rows "
                             "must be a multiple of rollout.n and rows of one prompt must be adjacent")
        seen |= groups.keys()
        chunks.append(list(groups.values()))
    return chunks


def balance_groups(batch: RolloutBatch, chunk_rows: int, dp_group, dp_rank: int,
                   dp_size: int) -> tuple[RolloutBatch, dict[str, float]]:
    """Move whole groups between dp ranks so every rank gets about the same prompt+response tokens.

    Length balancing as verl's ``balance_batch`` (Sheng et al. 2024, arXiv:2409.19256), per
    slice: ``chunk_rows`` is the rows of one rank's share of a PPO mini-batch (the gcd of the
    actor's and the critic's), and groups move only between the ranks' copies of the same slice,
    so every global mini-batch keeps the same set of prompts and the update is unchanged. Groups
    stay whole (group statistics are unchanged) and every rank keeps its number of groups per
    slice (mini-batch slicing needs equal rows), via
    :func:`~spmd_rl.data.batching.balanced_assignment`.

    Two ``all_gather_object`` calls on ``dp_group``: group loads (small), then only the rows that
    change rank. When the balanced plan is not better than the current layout nothing moves.
    Returns this rank's new batch and ``perf/balance_ratio_before`` / ``_after`` (max / mean
    tokens per rank over the whole batch; the same on every rank)."""
    if dp_size == 1:
        return batch, {"perf/balance_ratio_before": 1.0, "perf/balance_ratio_after": 1.0}
    lengths = sequence_lengths(batch)
    mine = _groups_of_chunks(batch, chunk_rows)
    meta = [[(sum(lengths[r] for r in rows), len(rows)) for rows in chunk] for chunk in mine]
    gathered: list = [None] * dp_size  # [rank][chunk][group] -> (tokens, rows)
    dist.all_gather_object(gathered, meta, group=dp_group)
    _check_layout(gathered)

    # items of chunk j: rank 0's groups, then rank 1's, ... (the same list on every rank)
    owners = [[s for s in range(dp_size) for _ in gathered[s][j]] for j in range(len(mine))]
    loads = [[load for s in range(dp_size) for load, _ in gathered[s][j]] for j in range(len(mine))]
    plan = balanced_assignment(loads, dp_size)
    before = balance_ratio(_rank_totals(loads, owners, dp_size))
    after = balance_ratio(_rank_totals(loads, plan, dp_size))
    metrics = {"perf/balance_ratio_before": before, "perf/balance_ratio_after": min(before, after)}
    if after >= before:  # the heuristic found nothing better: skip the exchange
        return batch, metrics

    # send the rows of my groups that go elsewhere, in (chunk, group) order
    leaving = [r for j, chunk in enumerate(mine) for g, rows in enumerate(chunk)
               if plan[j][_item(gathered, j, dp_rank, g)] != dp_rank for r in rows]
    received: list = [None] * dp_size
    dist.all_gather_object(received, batch.select(leaving), group=dp_group)

    # the pool: my batch, then every other rank's leaving rows; then pick mine in slice order
    pieces, order, offset = [batch], [], len(batch)
    sent_offset = {}
    for s in range(dp_size):
        if s != dp_rank:
            pieces.append(received[s])
            sent_offset[s] = offset
            offset += len(received[s])
    cursor = dict(sent_offset)
    for j in range(len(mine)):
        for s in range(dp_size):
            for g, (_, size) in enumerate(gathered[s][j]):
                target = plan[j][_item(gathered, j, s, g)]
                if s == dp_rank:
                    if target == dp_rank:
                        order.extend(mine[j][g])
                    continue
                if target == dp_rank:
                    order.extend(range(cursor[s], cursor[s] + size))
                if target != s:  # rank s sent this group: it sits in s's piece
                    cursor[s] += size
    pool = concat_batches([p for p in pieces if len(p)])
    return pool.select(order), metrics


def _item(gathered: list, chunk: int, rank: int, group: int) -> int:
    """Position of rank ``rank``'s ``group``-th group of slice ``chunk`` in that slice's item list."""
    return sum(len(gathered[s][chunk]) for s in range(rank)) + group


def _rank_totals(loads: list[list[int]], owner: list[list[int]], k: int) -> list[int]:
    totals = [0] * k
    for chunk_loads, chunk_owner in zip(loads, owner):
        for load, rank in zip(chunk_loads, chunk_owner):
            totals[rank] += load
    return totals


def _check_layout(gathered: list) -> None:
    """Every rank must have the same slices with the same number of groups, all of one size:
    the balanced layout keeps both, so each rank still holds the same rows per mini-batch."""
    shapes = {tuple(len(chunk) for chunk in rank) for rank in gathered}
    sizes = {size for rank in gathered for chunk in rank for _, size in chunk}
    if len(shapes) > 1 or len(sizes) > 1:
        raise ValueError(f"trainer.balance_batch needs every rank to hold the same number of groups per "
                         f"mini-batch, all of the same size; got groups per slice {sorted(shapes)} and group "
                         f"sizes {sorted(sizes)}")
