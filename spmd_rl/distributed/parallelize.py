"""Parallelize a decoder: tensor/sequence parallelism first, then FSDP2 with one ``fully_shard``
per block and one for the root (torchtitan's order)."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from spmd_rl.errors import UserError


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a native or HF decoder (``model.layers``), also when wrapped by
    the trainer's ``PolicyModel`` / ``ValueModel`` (``.decoder``). Other transformers models keep
    them elsewhere (GPT-2: ``transformer.h``): their blocks are the modules of the classes the
    model declares unsplittable (``_no_split_modules``, what accelerate's device maps keep whole)."""
    model = getattr(model, "decoder", model)
    model = getattr(model, "hf_model", model)  # the generic transformers path (GenericCausalLM)
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None and hasattr(inner, "get_decoder"):
        layers = getattr(inner.get_decoder(), "layers", None)
    if layers is not None:
        return list(layers)
    return _unsplittable_blocks(model)


def _unsplittable_blocks(model: nn.Module) -> list[nn.Module]:
    """The outermost modules of ``model``'s ``_no_split_modules`` classes, when they are the
    children of one ``nn.ModuleList`` (a stack of blocks); otherwise none."""
    block_classes = set(getattr(model, "_no_split_modules", None) or ())
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) and all(
                type(child).__name__ in block_classes for child in module):
            return list(module)  # modules() is pre-order: the first such list is the outermost
    return []


def apply_model_parallel(decoder: nn.Module, dims, mesh: DeviceMesh):
    """Tensor and sequence parallelism of a decoder, before FSDP wraps it; returns the Ulysses
    group for the packed forwards (None without sequence parallelism)."""
    if dims.tp == 1 and dims.sp == 1:
        return None
    from spmd_rl.models.decoder import Transformer

    if not isinstance(decoder, Transformer):
        raise UserError(f"parallel.tp={dims.tp} / parallel.sp={dims.sp} need the native decoder, got "
                         f"{type(decoder).__name__}: use a Llama/Qwen/Mistral model or parallel.tp=1 parallel.sp=1")
    if dims.tp > 1:
        from spmd_rl.distributed.tensor_parallel import apply_tp

        apply_tp(decoder, mesh["tp"])
    if dims.sp == 1:
        return None
    from spmd_rl.distributed.ulysses import apply_sequence_parallel

    group = mesh["sp"].get_group()
    apply_sequence_parallel(decoder, group, tp=dims.tp)
    return group


def apply_fsdp(model: nn.Module, dp_mesh: DeviceMesh, *, param_dtype: torch.dtype | None = None,
               reduce_dtype: torch.dtype = torch.float32, offload_to_cpu: bool = False) -> nn.Module:
    """Shard parameters over ``dp_mesh``; with ``param_dtype`` set (bf16 on GPU) compute runs in
    that dtype while master weights, gradients reductions and the optimizer stay in fp32.

    ``offload_to_cpu`` (CUDA meshes only) keeps the shards in pinned host memory and copies each
    block to the GPU for its forward: a frozen model then costs no GPU memory between uses."""
    if offload_to_cpu and dp_mesh.device_type != "cuda":
        raise ValueError("offload_to_cpu needs a CUDA mesh: on CPU the parameters already live in host memory")
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    offload = CPUOffloadPolicy(pin_memory=True) if offload_to_cpu else OffloadPolicy()
    blocks = decoder_blocks(model)
    for i, block in enumerate(blocks):
        # The last block's parameters are needed right away by the backward: keep them gathered.
        fully_shard(block, mesh=dp_mesh, mp_policy=mp, offload_policy=offload,
                    reshard_after_forward=i < len(blocks) - 1)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, offload_policy=offload)
    return model
