"""Continuous-batching scheduler, without a model: step plans computed by hand, preemption by
recompute, prefix sharing with copy-on-write, and a simulated KV cache that checks every
sequence always reads exactly its own tokens through its block table."""

from __future__ import annotations

import random

import pytest
import torch

torch.set_num_threads(1)

from spmd_rl.errors import UserError  # noqa: E402
from spmd_rl.rollout.native.block_pool import BlockAllocator  # noqa: E402
from spmd_rl.rollout.native.scheduler import Scheduler, Sequence, StepPlan  # noqa: E402


def seq(seq_id: int, prompt_len: int, max_len: int) -> Sequence:
    return Sequence(seq_id, [100 + seq_id * 10 + i for i in range(prompt_len)], max_len)


def fake_token(s: Sequence) -> int:
    return (s.seq_id * 7 + len(s.tokens)) % 50


class FakeEngine:
    """Stands in for the model: keeps a token-level KV store per block, applies the plan's copies
    and writes, checks that each chunk's context is exactly its sequence's tokens, then samples a
    deterministic token for every sampling row and finishes sequences at ``max_len``."""

    def __init__(self, sched: Scheduler, block_size: int) -> None:
        self.sched, self.bs = sched, block_size
        self.kv: dict[int, list] = {}
        self.plans: list[StepPlan] = []
        self.max_running = 0

    def step(self) -> StepPlan:
        plan = self.sched.schedule()
        self.plans.append(plan)
        assert plan.num_tokens <= self.sched.max_num_batched_tokens
        for src, dst in plan.copies:
            self.kv[dst] = list(self.kv.get(src, [None] * self.bs))
        for c in plan.chunks:
            table = c.seq.block_table
            assert len(table) * self.bs >= c.start + c.num_tokens
            for p in range(c.start, c.start + c.num_tokens):
                self.kv.setdefault(table[p // self.bs], [None] * self.bs)[p % self.bs] = c.seq.tokens[p]
        for c in plan.chunks:  # reads after all writes, as attention does
            table = c.seq.block_table
            context = [self.kv[table[p // self.bs]][p % self.bs] for p in range(c.start + c.num_tokens)]
            assert context == c.seq.tokens[: c.start + c.num_tokens], f"seq {c.seq.seq_id} reads foreign KV"
        running = sum(s.width for s in self.sched.running if not s.finished)
        self.max_running = max(self.max_running, running)
        for c in plan.chunks:
            if c.samples:
                for s in [c.seq, *c.forks]:
                    self.sched.append_token(s, fake_token(s))
                    if len(s.tokens) >= s.max_len:
                        self.sched.finish(s)
        return plan

    def run(self, max_steps: int = 10_000) -> None:
        for _ in range(max_steps):
            if not self.sched.has_unfinished():
                return
            self.step()
        raise AssertionError("scheduler did not finish")


def expected_tokens(s: Sequence, prompt_len: int) -> list[int]:
    """Tokens the sequence ends with when sampled by fake_token, however it was scheduled."""
    toks = s.tokens[:prompt_len]
    while len(toks) < s.max_len:
        toks.append((s.seq_id * 7 + len(toks)) % 50)
    return toks


def summary(plan: StepPlan) -> list[tuple[int, int, int, bool]]:
    return [(c.seq.seq_id, c.start, c.num_tokens, c.samples) for c in plan.chunks]


def test_chunked_prefill_budget_and_max_num_seqs():
    sched = Scheduler(BlockAllocator(64), block_size=4, max_num_seqs=2, max_num_batched_tokens=6)
    a, b, c = seq(0, 5, 8), seq(1, 3, 6), seq(2, 2, 5)
    for s in (a, b, c):
        sched.add(s)
    eng = FakeEngine(sched, 4)
    # Step 1: A's whole prompt (5) + the first token of B's prompt (budget 6 left 1).
    assert summary(eng.step()) == [(0, 0, 5, True), (1, 0, 1, False)]
    # Step 2: A decodes, B finishes its prompt; C waits (2 running = max_num_seqs).
    assert summary(eng.step()) == [(0, 5, 1, True), (1, 1, 2, True)]
    assert list(sched.waiting) == [c]
    eng.run()
    assert eng.max_running == 2
    for s, p in ((a, 5), (b, 3), (c, 2)):
        assert s.tokens == expected_tokens(s, p) and s.finished
    # C entered in the step right after A (the first to end: 3 sampling steps) freed its slot.
    first_c = next(i for i, plan in enumerate(eng.plans) if any(ch.seq is c for ch in plan.chunks))
    a_done = max(i for i, plan in enumerate(eng.plans) if any(ch.seq is a for ch in plan.chunks))
    assert (a_done, first_c) == (2, 3)
    assert sched.allocator.num_free == 64 and sched.num_preemptions == 0


def test_preemption_by_recompute_hand_computed():
    sched = Scheduler(BlockAllocator(4), block_size=2, max_num_seqs=2, max_num_batched_tokens=100)
    a, b = seq(0, 3, 8), seq(1, 3, 6)
    sched.add(a)
    sched.add(b)
    eng = FakeEngine(sched, 2)
    assert summary(eng.step()) == [(0, 0, 3, True), (1, 0, 3, True)]  # 2 + 2 blocks: pool full
    assert sched.allocator.num_free == 0
    assert summary(eng.step()) == [(0, 3, 1, True), (1, 3, 1, True)]  # position 3 fits block 1
    # A needs a third block: B (admitted last) is preempted, its blocks freed, queued first.
    plan = eng.step()
    assert summary(plan) == [(0, 4, 1, True)] and plan.preempted == [b]
    assert sched.num_preemptions == 1 and b.block_table == [] and b.num_computed == 0
    assert list(sched.waiting) == [b] and len(b.tokens) == 5  # prompt 3 + 2 generated
    # B needs 3 blocks for prompt + generated tokens; only 1 is free until A ends.
    assert summary(eng.step()) == [(0, 5, 1, True)]
    assert summary(eng.step()) == [(0, 6, 1, True)]
    assert a.finished and len(a.tokens) == 8
    # B is prefilled again with its generated tokens appended, and carries on.
    assert summary(eng.step()) == [(1, 0, 5, True)]
    assert b.finished and b.tokens == expected_tokens(b, 3)
    assert a.tokens == expected_tokens(a, 3)
    assert sched.allocator.num_free == 4 and not sched.has_unfinished()


def test_prefix_sharing_fork_and_copy_on_write():
    alloc = BlockAllocator(16)
    sched = Scheduler(alloc, block_size=4, max_num_seqs=4, max_num_batched_tokens=64)
    leader, f1, f2 = seq(0, 6, 9), seq(1, 6, 9), seq(2, 6, 9)
    f1.tokens, f2.tokens = list(leader.tokens), list(leader.tokens)  # samples of the leader's prompt
    sched.add(leader, followers=[f1, f2])
    eng = FakeEngine(sched, 4)
    plan = eng.step()
    # One prefill of the prompt; both followers fork off it in the same step.
    assert summary(plan) == [(0, 0, 6, True)] and plan.chunks[0].forks == [f1, f2]
    assert leader.block_table == f1.block_table == f2.block_table == [0, 1]
    assert alloc.refcount(0) == alloc.refcount(1) == 3 and alloc.num_used == 2
    assert sched.prefix_hit_blocks == 4  # 2 followers x 2 prompt blocks not recomputed
    assert [len(s.tokens) for s in (leader, f1, f2)] == [7, 7, 7]
    # First generated token: position 6 lies in the shared partial block 1. The first two
    # writers copy it; the last one is its only owner by then and writes in place.
    plan = eng.step()
    assert plan.copies == [(1, 2), (1, 3)]
    assert (leader.block_table, f1.block_table, f2.block_table) == ([0, 2], [0, 3], [0, 1])
    assert alloc.refcount(0) == 3 and [alloc.refcount(b) for b in (1, 2, 3)] == [1, 1, 1]
    eng.run()
    for s in (leader, f1, f2):
        assert s.tokens == expected_tokens(s, 6)
    # Positions 0..7 hold K/V: the full prompt block 0 shared by all three, plus one tail each.
    assert alloc.num_free == 16 and alloc.peak_used == 1 + 3


def test_never_fits_is_a_user_error_and_bad_arguments():
    sched = Scheduler(BlockAllocator(2), block_size=4, max_num_seqs=4, max_num_batched_tokens=8)
    sched.add(seq(0, 3, 9))  # 8 K/V slots: exactly 2 blocks
    with pytest.raises(UserError) as err:
        sched.add(seq(1, 3, 10))
    assert str(err.value) == (
        "a sequence of up to 10 tokens (prompt 3 + response) needs 3 KV blocks of 4 tokens but the pool holds 2; "
        "raise rollout.kv_cache_gb (rollout.gpu_memory_utilization on GPU) or lower the max_seq_len "
        "(data.max_prompt_length + data.max_response_length)"
    )
    with pytest.raises(ValueError) as err:
        sched.add(seq(2, 3, 5), followers=[seq(3, 3, 5)])
    assert str(err.value) == ("follower 3 has other tokens than its leader 2; followers must be samples of the "
                              "same prompt")
    with pytest.raises(ValueError) as err:
        Scheduler(BlockAllocator(2), 4, max_num_seqs=2, max_num_batched_tokens=8).add(
            seq(4, 2, 5), followers=[Sequence(5, [140, 141], 5), Sequence(6, [140, 141], 5)])
    assert str(err.value) == ("a leader with 2 followers needs 3 running slots, more than max_num_seqs=2; "
                              "add the samples one by one")
    with pytest.raises(ValueError, match="max_num_seqs and max_num_batched_tokens must be >= 1, got 0 and 8"):
        Scheduler(BlockAllocator(2), 4, max_num_seqs=0, max_num_batched_tokens=8)


@pytest.mark.parametrize("num_blocks, share", [(6, False), (6, True), (9, True), (200, True)])
def test_random_workloads_finish_with_own_context(num_blocks, share):
    """Many sequences, a small pool, small budgets: every step respects its budgets, every
    sequence reads only its own K/V, all end with the tokens they would have alone, and every
    block comes back."""
    rng = random.Random(num_blocks)
    bs = 4
    sched = Scheduler(BlockAllocator(num_blocks), block_size=bs, max_num_seqs=5, max_num_batched_tokens=7)
    groups, sid = [], 0
    for _ in range(8):
        plen, max_len, n = rng.randint(1, 9), 0, rng.randint(1, 3)
        max_len = min(plen + rng.randint(1, 12), num_blocks * bs + 1)
        prompt = [rng.randrange(50) for _ in range(plen)]
        members = [Sequence(sid + j, list(prompt), max_len) for j in range(n)]
        sid += n
        if share:
            sched.add(members[0], followers=members[1:])
        else:
            for m in members:
                sched.add(m)
        groups.append((plen, members))
    eng = FakeEngine(sched, bs)
    eng.run()
    assert eng.max_running <= 5
    for plen, members in groups:
        for m in members:
            assert m.finished and m.tokens == expected_tokens(m, plen)
    assert sched.allocator.num_free == num_blocks
    if num_blocks == 6:
        assert sched.num_preemptions > 0
    if num_blocks == 200:
        assert sched.num_preemptions == 0 and (sched.prefix_hit_blocks > 0) == share
