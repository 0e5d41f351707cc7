"""Paged KV storage for the generation engine (PagedAttention, Kwon et al. 2023, arXiv:2309.06180).

The cache is cut into fixed-size blocks of ``block_size`` token slots. A sequence owns a list of
block ids (its block table) instead of one contiguous row, so memory is taken a block at a time
as it grows and given back the moment it ends, and several sequences can point at the same
block (the n samples of one prompt share the prompt's blocks).

Two parts, split so the scheduler's bookkeeping can be tested without tensors:

- :class:`BlockAllocator`: the free list and a reference count per block (pure Python).
- :class:`KVPool`: the tensors, per layer ``k`` and ``v`` of shape ``[num_blocks, block_size,
  Hkv, D]`` (the layout ``kernels.paged_attention`` reads), preallocated once.

:func:`num_blocks_for_budget` sizes the pool from a memory budget: ``rollout.kv_cache_gb`` on
CPU, ``rollout.gpu_memory_utilization`` x the free device memory on GPU.
"""

from __future__ import annotations

import torch

from spmd_rl.errors import UserError
from spmd_rl.models.args import ModelArgs


def check_block_size(block_size: int) -> None:
    """UserError unless ``block_size`` is a power of two (what the paged decode kernel needs)."""
    if not isinstance(block_size, int) or block_size < 1 or block_size & (block_size - 1):
        raise UserError(f"rollout.block_size must be a power of two (1, 2, 4, 8, 16, 32, ...); got {block_size!r}")


def blocks_for_tokens(num_tokens: int, block_size: int) -> int:
    """Blocks needed to hold ``num_tokens`` token slots: ``ceil(num_tokens / block_size)``."""
    return -(-num_tokens // block_size)


class BlockAllocator:
    """Free list and reference counts of ``num_blocks`` KV blocks.

    A block is free at refcount 0. :meth:`allocate` hands out a free block at refcount 1,
    :meth:`share` adds an owner (a forked sequence), :meth:`release` drops one and returns the
    block to the free list when the last owner lets go.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        # pop() from the end hands out the lowest ids first (deterministic, easy to read in tests).
        self._free = list(range(num_blocks - 1, -1, -1))
        self._refs = [0] * num_blocks
        self.peak_used = 0  # most blocks in use at once since construction

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def refcount(self, block: int) -> int:
        """Owners of ``block`` (0 = free)."""
        return self._refs[block]

    def allocate(self) -> int:
        """A free block, now owned once. The caller checks :attr:`num_free` first."""
        if not self._free:
            raise ValueError(f"no free KV block left (all {self.num_blocks} in use); check num_free before allocate")
        block = self._free.pop()
        self._refs[block] = 1
        self.peak_used = max(self.peak_used, self.num_blocks - len(self._free))
        return block

    def share(self, block: int) -> None:
        """One more owner of an allocated ``block``."""
        if self._refs[block] == 0:
            raise ValueError(f"cannot share KV block {block}: it is free; only allocated blocks can be shared")
        self._refs[block] += 1

    def release(self, block: int) -> None:
        """Drop one owner of ``block``; it returns to the free list at refcount 0."""
        if self._refs[block] == 0:
            raise ValueError(f"cannot release KV block {block}: it is already free (double release)")
        self._refs[block] -= 1
        if self._refs[block] == 0:
            self._free.append(block)


class KVPool:
    """Per-layer key and value blocks, ``k[layer]`` and ``v[layer]`` each ``[num_blocks, block_size, Hkv, D]``.

    Slot ``s`` of the flattened pool (``s = block * block_size + offset``) holds one token's
    ``[Hkv, D]`` keys (values). The decoder writes a forward call's new tokens with :meth:`write`
    and reads whole blocks through block tables.
    """

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        check_block_size(block_size)
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        # Zeros, not empty: the torch decode path reads masked slots (times a zero weight), which
        # must hold finite numbers (uninitialised memory may hold NaN bit patterns).
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_blocks, self.block_size = num_blocks, block_size
        self._scratch: tuple[torch.Tensor, torch.Tensor] | None = None  # see gather_scratch

    @classmethod
    def for_model(
        cls, args: ModelArgs, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device | str
    ) -> KVPool:
        """A pool shaped for the decoder described by ``args``."""
        return cls(args.num_layers, num_blocks, block_size, args.num_kv_heads, args.head_dim, dtype, device)

    def write(
        self,
        layer: int,
        slots: torch.Tensor,  # [N] flat slot of each token
        k: torch.Tensor,  # [N, Hkv, D]
        v: torch.Tensor,  # [N, Hkv, D]
    ) -> None:
        """Store N tokens' keys and values of ``layer`` at their flat slots."""
        kf = self.k[layer].view(-1, *self.k[layer].shape[2:])  # [num_blocks * block_size, Hkv, D]
        vf = self.v[layer].view(-1, *self.v[layer].shape[2:])
        kf.index_copy_(0, slots, k.to(kf.dtype))
        vf.index_copy_(0, slots, v.to(vf.dtype))

    def gather_scratch(self, num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Key and value buffers, each ``[num_blocks, block_size, Hkv, D]``, that the torch decode
        path gathers sequences' blocks into (``paged_decode_attention_sdpa``).

        One pair serves every layer and step, grown when a step needs more: on CPU a fresh
        multi-MB tensor per layer and step costs more in page faults than the gather itself.
        The contents are overwritten by the next call; it holds at most one layer's worth of
        the longest step's gathered keys and values."""
        if self._scratch is None or self._scratch[0].shape[0] < num_blocks:
            like = self.k[0]
            shape = (num_blocks, *like.shape[1:])
            self._scratch = (torch.empty(shape, dtype=like.dtype, device=like.device),
                             torch.empty(shape, dtype=like.dtype, device=like.device))
        keys, values = self._scratch
        return keys[:num_blocks], values[:num_blocks]

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy block ``src`` onto block ``dst`` in every layer, for each ``(src, dst)`` (copy-on-write)."""
        if not pairs:
            return
        device = self.k[0].device
        src = torch.tensor([s for s, _ in pairs], device=device)
        dst = torch.tensor([d for _, d in pairs], device=device)
        for pool in self.k + self.v:
            pool[dst] = pool[src]

    def nbytes(self) -> int:
        """Total memory of all layers' key and value blocks."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


def block_nbytes(args: ModelArgs, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one block across all layers, keys and values."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * args.num_layers * block_size * args.num_kv_heads * args.head_dim * itemsize


def num_blocks_for_budget(
    args: ModelArgs,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
    *,
    kv_cache_gb: float,
    gpu_memory_utilization: float,
    max_blocks: int | None = None,
) -> int:
    """How many blocks the pool gets.

    CPU: ``kv_cache_gb`` GiB. CUDA: ``gpu_memory_utilization`` x the device memory free right now
    (after the model's weights and whatever training still holds), as vLLM sizes its cache.
    Capped at ``max_blocks`` (the most the engine could ever use at once). UserError when the
    budget holds less than one block.
    """
    per_block = block_nbytes(args, block_size, dtype)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget, knob = free * gpu_memory_utilization, f"rollout.gpu_memory_utilization={gpu_memory_utilization}"
    else:
        budget, knob = kv_cache_gb * 2**30, f"rollout.kv_cache_gb={kv_cache_gb}"
    num_blocks = int(budget // per_block)
    if num_blocks < 1:
        raise UserError(
            f"{knob} leaves room for no KV block ({per_block} bytes each at rollout.block_size={block_size}); "
            "raise it or lower rollout.block_size"
        )
    return num_blocks if max_blocks is None else max(1, min(num_blocks, max_blocks))
