"""Pieces of the RL loop added with the algorithm library: DAPO filtering and overlong shaping,
batch concatenation, the value model, and the greedy ReMax baseline."""

from __future__ import annotations

import pytest
import torch

from spmd_rl.models import ModelArgs, build_model
from spmd_rl.rewards.overlong import overlong_penalty
from spmd_rl.rollout.types import Completion
from spmd_rl.trainer.batch import build_rollout_batch, concat_batches
from spmd_rl.trainer.critic import ValueModel, forward_values
from spmd_rl.trainer.dynamic_sampling import informative_groups
from tests.distributed.launcher import run_on_ranks

torch.set_num_threads(1)


def tiny_args(num_layers: int) -> ModelArgs:
    return ModelArgs(architecture="LlamaForCausalLM", model_type="llama", vocab_size=32, hidden_size=16,
                     intermediate_size=32, num_layers=num_layers, num_heads=2, num_kv_heads=1, head_dim=8)


def batch_of(groups: list[list[list[int]]], scores: list[float]):
    prompts = [[1, 2]] * len(groups)
    completions = [[Completion(r, [0.0] * len(r), "stop") for r in group] for group in groups]
    batch = build_rollout_batch(prompts, completions)
    batch.scores = torch.tensor(scores)
    return batch


def test_informative_groups_drops_groups_with_equal_rewards():
    scores = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.5])
    group_index = torch.tensor([0, 0, 1, 1, 2, 2, 3])  # group 3 is a singleton: kept, as verl does
    assert informative_groups(scores, group_index).tolist() == [False, False, True, True, False, False, True]


def test_overlong_penalty_is_linear_inside_the_buffer():
    lengths = torch.tensor([3, 6, 7, 8, 10])
    penalty = overlong_penalty(lengths, max_response_length=10, buffer_len=4, penalty_factor=1.0)
    # expected length 6: 0 up to 6 tokens, then -1/4 per token, -1 at the maximum
    assert penalty.tolist() == [0.0, 0.0, -0.25, -0.5, -1.0]
    with pytest.raises(ValueError, match="buffer_len must be in"):
        overlong_penalty(lengths, max_response_length=10, buffer_len=10, penalty_factor=1.0)


def test_concat_batches_pads_and_keeps_groups_distinct():
    a = batch_of([[[5, 6], [7]]], [1.0, 0.0])
    b = batch_of([[[8, 9, 10]], [[11]]], [0.5, 0.25])
    merged = concat_batches([a, b])
    assert merged.group_index.tolist() == [0, 0, 1, 2]
    assert merged.response_mask.tolist() == [[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 0, 0]]
    assert merged.scores.tolist() == [1.0, 0.0, 0.5, 0.25]
    assert merged.response_ids == [[5, 6], [7], [8, 9, 10], [11]]
    assert len(merged.select([])) == 0  # an empty selection is a valid (empty) batch


def test_value_model_starts_at_zero_and_reads_the_response_positions():
    args = tiny_args(num_layers=1)
    critic = ValueModel(build_model(None, args=args, seed=0), args.hidden_size)
    batch = batch_of([[[5, 6, 7], [8]]], [1.0, 0.0])
    assert forward_values(critic, batch, "cpu").abs().max().item() == 0.0
    torch.nn.init.ones_(critic.value_head.weight)
    values = forward_values(critic, batch, "cpu")  # [B, T]: one value per response token, 0 on padding
    hidden = critic.decoder(torch.tensor([[1, 2, 5, 6, 7]]), torch.arange(5)[None])[0]  # [5, H]
    expected = hidden[1:4].sum(-1)  # positions 1..3 predict the three response tokens
    assert torch.allclose(values[0], expected, atol=1e-5)
    assert values[1, 1:].abs().max().item() == 0.0


def _take_global_groups(rank, world_size):
    from spmd_rl.trainer.dynamic_sampling import take_global_groups

    # rank 0 kept 3 groups, rank 1 kept 1: 4 usable groups are dealt 2 and 2,
    # one of each mini-batch of 2 groups per rank
    if rank == 0:
        local = batch_of([[[1]], [[2]], [[3]]], [0.0, 1.0, 2.0])
    else:
        local = batch_of([[[4]]], [3.0])
    mine = take_global_groups(local, 4, 2, None, rank, world_size)
    assert mine.scores.tolist() == ([0.0, 2.0] if rank == 0 else [1.0, 3.0])
    assert mine.response_ids == ([[1], [3]] if rank == 0 else [[2], [4]])
    whole = take_global_groups(local, 4, 4, None, rank, world_size)  # one mini-batch: contiguous halves
    assert whole.scores.tolist() == ([0.0, 1.0] if rank == 0 else [2.0, 3.0])

    # Kept over three generation batches of 4 prompts (2 per rank): rank 0 kept A0, B0, C0, C1,
    # rank 1 kept A2, C2, C3 (letter = batch, digit = position in the global batch). One rank
    # would take the first 4 in generation order, A0 A2 B0 C0, and so must two.
    names = [["A0", "B0", "C0", "C1"], ["A2", "C2", "C3"]][rank]
    keys = [("ABC".index(n[0]) + 1, int(n[1])) for n in names]
    score = {"A0": 0.0, "A2": 1.0, "B0": 2.0, "C0": 3.0, "C1": 4.0, "C2": 5.0, "C3": 6.0}
    local = batch_of([[[7], [8]]] * len(names), [score[n] for n in names for _ in range(2)])
    mine = take_global_groups(local, 4, 4, None, rank, world_size, order=keys)
    assert mine.scores.tolist() == ([0.0, 0.0, 1.0, 1.0] if rank == 0 else [2.0, 2.0, 3.0, 3.0])


def test_take_global_groups_deals_equal_shares_over_ranks():
    run_on_ranks(_take_global_groups, 2)


def test_sampling_seeds_differ_per_step_generation_batch_and_prompt():
    from spmd_rl.trainer.rng import sampling_seed

    # the old linear mix (seed * 1_000_003 + step * 100_003 + index) gave these two the same seed
    assert sampling_seed(0, 0, 1, 100_003) != sampling_seed(0, 1, 1, 0)
    # a DAPO refill that draws prompt 7 again in the same step samples it afresh
    assert sampling_seed(3, 5, 1, 7) != sampling_seed(3, 5, 2, 7)
    seeds = {sampling_seed(1, step, gen, index) for step in range(20) for gen in (1, 2) for index in range(500)}
    assert len(seeds) == 20 * 2 * 500  # no collision among 20k (a 31-bit hash: ~0.1 expected)
    assert all(0 <= s < 2**31 for s in seeds)
    assert sampling_seed(1, 2, 1, 3) == sampling_seed(1, 2, 1, 3) == 918_449_620  # stable across runs


def _fsdp_units(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from spmd_rl.distributed.parallelize import apply_fsdp
    from spmd_rl.trainer.actor import compute_logprobs
    from spmd_rl.trainer.policy import PolicyModel

    args = tiny_args(num_layers=2)
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("dp",))
    policy = apply_fsdp(PolicyModel(build_model(None, args=args, seed=0)), mesh["dp"])
    # one FSDP unit per block plus the root, also through the PolicyModel wrapper
    assert all(isinstance(block, FSDPModule) for block in policy.decoder.model.layers)
    compute_logprobs(policy, batch_of([[[5, 6], [7]]], [1.0, 0.0]), 1.0, 8, "cpu")
    # a no-grad pass leaves every parameter sharded again (the frozen reference must not keep a full copy)
    assert all(isinstance(p, DTensor) for p in policy.parameters())


def test_fsdp_wraps_every_block_and_reshards_after_scoring():
    run_on_ranks(_fsdp_units, 2)
