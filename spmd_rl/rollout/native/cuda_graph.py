"""Decode steps through fixed buffers, replayed as CUDA graphs on the GPU.

Once prompts are prefilled, most engine steps feed one token per running sequence. At RL batch
sizes such a step is a few hundred small kernels whose launch cost, not the GPU, sets the
speed. A CUDA graph records the kernels of one decode forward once and replays them with a
single launch; it needs every tensor at a fixed address and every shape fixed, so:

- inputs live in static buffers (token ids, positions, block tables sized for the longest
  sequence) that each step overwrites;
- a step of ``b`` sequences runs the graph of the smallest captured batch size ``>= b``; the
  padding rows feed token 0 at position 0 through a *scratch* KV block that no sequence owns,
  so their (discarded) keys and values never land in a real sequence's cache;
- graphs are captured lazily, one per batch size on its first use, into one shared memory pool,
  and dropped when the engine frees its KV pool (``sleep``): their kernels hold the pool's
  addresses. Weight updates copy in place, so they keep the graphs valid.

The same padded fixed-buffer forward also runs without capture (``capture=False``), on any
device: that is how the CPU tests check the padding and scratch-block logic against the
engine's packed decode. Only the capture and replay themselves need CUDA.

Capture needs a forward with no host synchronisation: the native decoder's paged decode mode
through the Triton decode kernel (the torch decode path reads the longest length back to the
host), without tensor parallelism: its blocks' all-reduces are plain functional collectives,
but capturing NCCL collectives needs at least two GPUs to test and has not been run, so
tensor-parallel engines stay eager.
"""

from __future__ import annotations

import bisect

import torch


def default_capture_sizes(max_num_seqs: int) -> list[int]:
    """Batch sizes to capture: 1, 2, 4, then every multiple of 8, up to and including
    ``max_num_seqs`` (as vLLM does: padding a step costs at most 7 rows past 8)."""
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
    sizes = [s for s in (1, 2, 4) if s < max_num_seqs] + list(range(8, max_num_seqs, 8))
    return sizes + [max_num_seqs]


class DecodeGraphs:
    """Padded decode forwards of ``model`` over ``kv_cache`` for a fixed set of batch sizes.

    Args:
        model: the engine's native decoder (``Transformer``), forward mode 4 (paged decode).
        kv_cache: the engine's pool; block ``scratch_block`` must belong to no sequence.
        max_blocks_per_seq: width of the block-table buffer (blocks of the longest sequence).
        sizes: batch sizes to serve; a step of more sequences than the largest is refused.
        capture: record CUDA graphs (CUDA only) instead of running the forward eagerly.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        kv_cache,
        *,
        max_blocks_per_seq: int,
        sizes: list[int],
        scratch_block: int,
        capture: bool,
    ) -> None:
        device = kv_cache.k[0].device
        if capture and device.type != "cuda":
            raise ValueError(f"CUDA graph capture needs a CUDA device, the KV pool is on {device}")
        if not sizes or min(sizes) < 1:
            raise ValueError(f"sizes must be a non-empty list of batch sizes >= 1, got {sizes}")
        if not 0 <= scratch_block < kv_cache.num_blocks:
            raise ValueError(f"scratch_block {scratch_block} is outside the pool's {kv_cache.num_blocks} blocks")
        self.model, self.kv_cache, self.capture = model, kv_cache, capture
        self.sizes = sorted(set(sizes))
        self.scratch_block = scratch_block
        largest = self.sizes[-1]
        self.input_ids = torch.zeros(largest, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(largest, 1, dtype=torch.long, device=device)
        self.block_tables = torch.full((largest, max_blocks_per_seq), scratch_block, dtype=torch.int32, device=device)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}  # size -> the graph's static [size, H] output
        self._pool = None  # memory pool shared by this object's graphs
        self.num_captured = 0  # graphs recorded so far (observable in tests and logs)

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    def bucket(self, batch: int) -> int:
        """The smallest served size that holds ``batch`` sequences."""
        if not 1 <= batch <= self.max_batch:
            raise ValueError(f"a decode step of {batch} sequences is outside the captured sizes 1..{self.max_batch}")
        return self.sizes[bisect.bisect_left(self.sizes, batch)]

    def run(self, token_ids: list[int], positions: list[int], block_tables: list[list[int]]) -> torch.Tensor:
        """Hidden states ``[b, H]`` of one decode step: sequence ``i`` feeds ``token_ids[i]`` at
        ``positions[i]`` with blocks ``block_tables[i]``. The result is a view of a static
        buffer: read it before the next call."""
        b = len(token_ids)
        size = self.bucket(b)
        width = self.block_tables.shape[1]
        if any(len(t) > width for t in block_tables):
            raise ValueError(f"a block table is longer than the buffer's {width} blocks")
        device = self.input_ids.device
        tables = torch.full((size, width), self.scratch_block, dtype=torch.int32)
        for i, t in enumerate(block_tables):
            tables[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
        ids = torch.zeros(size, 1, dtype=torch.long)
        ids[:b, 0] = torch.tensor(token_ids, dtype=torch.long)
        pos = torch.zeros(size, 1, dtype=torch.long)  # padding rows: position 0 of the scratch block
        pos[:b, 0] = torch.tensor(positions, dtype=torch.long)
        self.input_ids[:size].copy_(ids.to(device, non_blocking=True))
        self.positions[:size].copy_(pos.to(device, non_blocking=True))
        self.block_tables[:size].copy_(tables.to(device, non_blocking=True))
        if not self.capture:
            return self._forward(size)[:b]
        if size not in self._graphs:
            self._record(size)
        self._graphs[size].replay()
        return self._outputs[size][:b]

    def _forward(self, size: int) -> torch.Tensor:
        hidden = self.model(self.input_ids[:size], self.positions[:size], kv_cache=self.kv_cache,
                            block_tables=self.block_tables[:size])  # [size, 1, H]
        return hidden[:, 0]

    def _record(self, size: int) -> None:
        # Warm up on a side stream first: Triton compiles, cuBLAS picks its kernels and the
        # allocator settles outside the capture (none of that may happen inside it).
        side = torch.cuda.Stream(device=self.input_ids.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward(size)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self._outputs[size] = self._forward(size)
        if self._pool is None:
            self._pool = graph.pool()
        self._graphs[size] = graph
        self.num_captured += 1
