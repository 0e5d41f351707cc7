"""Continuous batching over a paged KV cache: which tokens of which sequences run in each step.

Iteration-level scheduling (Orca, Yu et al. OSDI'22) with chunked prefill (Sarathi,
arXiv:2308.16369) over block-table memory (PagedAttention, arXiv:2309.06180), in the shape of
vLLM's scheduler:

- A step has a token budget ``max_num_batched_tokens``. Running sequences come first, oldest
  first: one decode token each, or the next chunk of a prompt still being prefilled. Waiting
  sequences are then admitted in arrival order while the running set stays within
  ``max_num_seqs``, the budget lasts and their chunk's blocks are free.
- A sequence needs blocks for every token it feeds. When a running sequence cannot get one,
  the most recently admitted running sequence is preempted by recompute: its blocks are
  freed and it goes back to the front of the waiting queue; its prompt and the tokens it has
  generated so far are prefilled again when it is readmitted. The oldest sequence therefore
  always progresses, and since every sequence fits the pool on its own, nothing deadlocks.
- Prefix sharing: the n samples of one prompt are added as a leader plus followers. Only the
  leader prefills the prompt; in the step that completes it the followers fork off: their
  block tables point at the leader's blocks (reference counted) and they sample their first
  token from the same logits. A sequence about to write into a block that others still
  share gets its own copy first (copy-on-write; in practice the prompt's last, partial block).

Pure bookkeeping: the scheduler never touches tensors. It returns a :class:`StepPlan` (chunks to
run, block copies to do first); the engine runs the forward, samples, and reports each new
token (:meth:`Scheduler.append_token`) or the end of a sequence (:meth:`Scheduler.finish`).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from spmd_rl.errors import UserError
from spmd_rl.rollout.native.block_pool import BlockAllocator, blocks_for_tokens


@dataclass(eq=False)
class Sequence:
    """One sequence to generate, as the scheduler sees it."""

    seq_id: int
    tokens: list[int]  # [prompt_len + generated] prompt then generated tokens
    max_len: int  # most tokens it can reach (prompt + response budget); its K/V needs max_len - 1 slots
    block_table: list[int] = field(default_factory=list)  # block of positions j*bs .. (j+1)*bs - 1
    num_computed: int = 0  # leading tokens whose K/V is in the cache
    followers: list[Sequence] = field(default_factory=list)  # samples forked off this prompt once prefilled
    admitted: int = -1  # admission stamp (higher = admitted later); -1 while waiting
    finished: bool = False

    @property
    def num_pending(self) -> int:
        """Tokens to feed before the next token can be sampled."""
        return len(self.tokens) - self.num_computed

    @property
    def width(self) -> int:
        """Running slots it takes: itself plus the followers it carries until they fork."""
        return 1 + len(self.followers)


@dataclass(slots=True)  # one per running sequence and step: cheap to build and read
class Chunk:
    """Tokens ``seq.tokens[start : start + num_tokens]`` fed at positions ``start ..`` this step."""

    seq: Sequence
    start: int
    num_tokens: int
    samples: bool  # the last token's logits give the next token (the chunk reaches the end)
    forks: list[Sequence] = field(default_factory=list)  # followers that sample from the same logits


@dataclass
class StepPlan:
    """One engine step: copy ``copies`` (src, dst) blocks, then run ``chunks`` as one packed batch."""

    chunks: list[Chunk]
    copies: list[tuple[int, int]]
    preempted: list[Sequence]

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    """Waiting queue + running set over a :class:`BlockAllocator`.

    Args:
        allocator: the pool's blocks (all free at the start).
        block_size: token slots per block.
        max_num_seqs: most sequences running at once (a leader counts its unforked followers).
        max_num_batched_tokens: most tokens fed per step (decode tokens + prefill chunks).
        watermark: fraction of blocks kept free when admitting next to running sequences, so
            a fresh admission is not preempted by the very next decode step.
    """

    def __init__(
        self,
        allocator: BlockAllocator,
        block_size: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        watermark: float = 0.01,
    ) -> None:
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_seqs and max_num_batched_tokens must be >= 1, got {max_num_seqs} and {max_num_batched_tokens}"
            )
        self.allocator, self.block_size = allocator, block_size
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.watermark_blocks = int(watermark * allocator.num_blocks)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self._slots = 0  # sum of width over running
        self._stamp = 0
        self.num_preemptions = 0
        self.prefix_hit_blocks = 0  # prompt blocks followers reused instead of computing

    # ------------------------------------------------------------------ queue

    def add(self, seq: Sequence, followers: list[Sequence] | tuple[Sequence, ...] = ()) -> None:
        """Queue ``seq``; ``followers`` (other samples of the same prompt, same tokens) fork off it
        once its prompt is prefilled. UserError when a sequence could never fit the whole pool."""
        for s in (seq, *followers):
            if s.tokens != seq.tokens:
                raise ValueError(f"follower {s.seq_id} has other tokens than its leader {seq.seq_id}; "
                                 "followers must be samples of the same prompt")
        if 1 + len(followers) > self.max_num_seqs:
            raise ValueError(f"a leader with {len(followers)} followers needs {1 + len(followers)} running slots, "
                             f"more than max_num_seqs={self.max_num_seqs}; add the samples one by one")
        need = blocks_for_tokens(seq.max_len - 1, self.block_size)
        if need > self.allocator.num_blocks:
            raise UserError(
                f"a sequence of up to {seq.max_len} tokens (prompt {len(seq.tokens)} + response) needs {need} KV "
                f"blocks of {self.block_size} tokens but the pool holds {self.allocator.num_blocks}; raise "
                "rollout.kv_cache_gb (rollout.gpu_memory_utilization on GPU) or lower the max_seq_len "
                "(data.max_prompt_length + data.max_response_length)"
            )
        seq.followers = list(followers)
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting) or any(not s.finished for s in self.running)

    def append_token(self, seq: Sequence, token: int) -> None:
        """Record the token sampled for ``seq`` (it is fed in a later step)."""
        seq.tokens.append(token)

    def finish(self, seq: Sequence) -> None:
        """``seq`` is done: give its blocks back (it leaves the running set at the next schedule)."""
        seq.finished = True
        self._free_blocks(seq)
        self._slots -= seq.width

    # ------------------------------------------------------------------ scheduling

    def schedule(self) -> StepPlan:
        """Plan the next step; see the module docstring for the policy."""
        self.running = [s for s in self.running if not s.finished]
        budget = self.max_num_batched_tokens
        chunks: list[Chunk] = []
        copies: list[tuple[int, int]] = []
        preempted: list[Sequence] = []

        block_size, refcount = self.block_size, self.allocator.refcount
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            start = seq.num_computed
            n = min(len(seq.tokens) - start, budget)
            table = seq.block_table
            if start + n <= len(table) * block_size and not (start % block_size
                                                              and refcount(table[start // block_size]) > 1):
                # Common decode case: its blocks already hold the new tokens and the block written
                # into is its own, so nothing is allocated, copied or preempted (what _take does then).
                seq.num_computed = start + n
                chunks.append(Chunk(seq, start, n, samples=start + n == len(seq.tokens)))
                budget -= n
                i += 1
                continue
            # Make room by preempting the newest sequences; the newest may be seq itself.
            cow = self._shared_write_block(seq)
            while self._blocks_needed(seq, n, cow) > self.allocator.num_free:
                victim = self._preempt_newest()
                preempted.append(victim)
                if victim is seq:
                    break
                cow = self._shared_write_block(seq)  # the victim may have been a co-owner
            if seq.admitted < 0:
                break  # seq was the newest left: everything after it is preempted too
            chunks.append(self._take(seq, n, copies, cow))
            budget -= n
            i += 1

        # Admission only when no one had to be preempted: free blocks are scarce this step.
        while not preempted and self.waiting and budget > 0:
            seq = self.waiting[0]
            if self._slots + seq.width > self.max_num_seqs:
                break
            n = min(seq.num_pending, budget)
            reserve = self.watermark_blocks if self.running else 0
            if blocks_for_tokens(n, self.block_size) + reserve > self.allocator.num_free:
                break
            self.waiting.popleft()
            seq.admitted, self._stamp = self._stamp, self._stamp + 1
            self.running.append(seq)
            self._slots += seq.width
            chunks.append(self._take(seq, n, copies, None))  # a waiting sequence owns no blocks
            budget -= n

        for chunk in chunks:
            if chunk.samples and chunk.seq.followers:
                chunk.forks = self._fork(chunk.seq)
        return StepPlan(chunks, copies, preempted)

    # ------------------------------------------------------------------ internals

    def _blocks_needed(self, seq: Sequence, n: int, cow: int | None) -> int:
        """New blocks ``seq`` needs to feed its next ``n`` tokens (growth + copy-on-write)."""
        grow = max(0, blocks_for_tokens(seq.num_computed + n, self.block_size) - len(seq.block_table))
        return grow + (cow is not None)

    def _shared_write_block(self, seq: Sequence) -> int | None:
        """Index in the block table of a block that others share and that seq's next token
        writes into (it must be copied first), else None."""
        j, offset = divmod(seq.num_computed, self.block_size)
        if offset and j < len(seq.block_table) and self.allocator.refcount(seq.block_table[j]) > 1:
            return j
        return None

    def _take(self, seq: Sequence, n: int, copies: list[tuple[int, int]], j: int | None) -> Chunk:
        """Give ``seq`` the blocks for ``n`` more tokens and advance it (the caller checked room);
        ``j``: its shared write block to copy first (``_shared_write_block``)."""
        if j is not None:
            old, new = seq.block_table[j], self.allocator.allocate()
            copies.append((old, new))
            self.allocator.release(old)
            seq.block_table[j] = new
        while len(seq.block_table) * self.block_size < seq.num_computed + n:
            seq.block_table.append(self.allocator.allocate())
        start = seq.num_computed
        seq.num_computed += n
        return Chunk(seq, start, n, samples=seq.num_computed == len(seq.tokens))

    def _fork(self, leader: Sequence) -> list[Sequence]:
        """Followers of a just-prefilled leader join the running set right after it, sharing its blocks."""
        forks, leader.followers = leader.followers, []
        for f in forks:
            f.block_table = list(leader.block_table)
            for block in f.block_table:
                self.allocator.share(block)
            f.num_computed, f.admitted = leader.num_computed, leader.admitted
        at = self.running.index(leader) + 1
        self.running[at:at] = forks
        self.prefix_hit_blocks += len(forks) * len(leader.block_table)
        return forks

    def _preempt_newest(self) -> Sequence:
        """Free the most recently admitted sequence's blocks and queue it first, to be prefilled
        again (recompute). Returns it."""
        seq = self.running.pop()
        self._slots -= seq.width
        self._free_blocks(seq)
        seq.num_computed, seq.admitted = 0, -1
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        return seq

    def _free_blocks(self, seq: Sequence) -> None:
        for block in seq.block_table:
            self.allocator.release(block)
        seq.block_table = []
