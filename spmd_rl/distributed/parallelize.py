"""Apply FSDP2 to a decoder: one ``fully_shard`` per block, then the root (torchtitan order)."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a native or HF decoder (``model.layers``)."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None and hasattr(inner, "get_decoder"):
        layers = getattr(inner.get_decoder(), "layers", None)
    return list(layers) if layers is not None else []


def apply_fsdp(model: nn.Module, dp_mesh: DeviceMesh, *, param_dtype: torch.dtype | None = None,
               reduce_dtype: torch.dtype = torch.float32) -> nn.Module:
    """Shard parameters over ``dp_mesh``; with ``param_dtype`` set (bf16 on GPU) compute runs in
    that dtype while master weights, gradients reductions and the optimizer stay in fp32."""
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    blocks = decoder_blocks(model)
    for i, block in enumerate(blocks):
        # The last block's parameters are needed right away by the backward: keep them gathered.
        fully_shard(block, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp)
    return model
