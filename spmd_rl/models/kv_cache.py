"""A contiguous KV cache: one ``[max_batch, Hkv, max_seq_len, D]`` tensor per layer for k and v.

Row ``r`` holds one sequence; slot ``p`` holds the key/value of its token at position ``p``.
The decoder writes into it during prefill and decode (see ``decoder.Transformer.forward``).
A paged cache with the same role replaces it in the generation engine.
"""

from __future__ import annotations

import torch

from spmd_rl.models.args import ModelArgs


class KVCache:
    """Per-layer key and value tensors, indexed ``[row, kv_head, slot, head_dim]``."""

    def __init__(
        self,
        num_layers: int,
        max_batch: int,
        max_seq_len: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (max_batch, num_kv_heads, max_seq_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_batch, self.max_seq_len = max_batch, max_seq_len

    @classmethod
    def for_model(
        cls,
        args: ModelArgs,
        max_batch: int,
        max_seq_len: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> KVCache:
        """A cache shaped for the decoder described by ``args``."""
        return cls(args.num_layers, max_batch, max_seq_len, args.num_kv_heads, args.head_dim, dtype, device)

    def write(
        self,
        layer: int,
        rows: torch.Tensor,  # [N] cache row of each token
        slots: torch.Tensor,  # [N] slot (= position) of each token
        k: torch.Tensor,  # [N, Hkv, D]
        v: torch.Tensor,  # [N, Hkv, D]
    ) -> None:
        """Store the keys/values of N tokens at ``(rows[i], :, slots[i])``."""
        # Advanced indices around a slice put the indexed dim first: the target is [N, Hkv, D].
        self.k[layer][rows, :, slots] = k.to(self.k[layer].dtype)
        self.v[layer][rows, :, slots] = v.to(self.v[layer].dtype)

    def nbytes(self) -> int:
        """Total memory of all layers' keys and values."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
