"""``torch.compile`` per decoder block, before FSDP (torchtitan's recipe).

Compiling block by block instead of the whole model keeps one small graph that every layer
reuses (same code and shapes: compiled once, then cached) and lets the packed attention's
per-sequence loop graph-break without splitting a whole-model graph. Each block is compiled in
place (``nn.Module.compile``): parameter names do not change, so checkpoints, weight sync and the
HF export are the same with and without compilation (a ``torch.compile(block)`` wrapper would add
``_orig_mod.`` under the checkpoint wrapper, where DCP's name cleaning does not look). FSDP's
hooks are skipped by dynamo (``torch._dynamo.config.skip_fsdp_hooks``) and run eagerly around
the compiled block. The rollout engine's own copy of the decoder stays eager.
"""

from __future__ import annotations

from torch import nn

from spmd_rl.distributed.activation_checkpoint import ac_mode, apply_ac
from spmd_rl.distributed.parallelize import decoder_blocks
from spmd_rl.errors import UserError


def apply_compile(model: nn.Module) -> nn.Module:
    """Compile every decoder block of ``model`` in place; returns ``model``. Compilation itself
    happens at a block's first forward."""
    blocks = decoder_blocks(model)
    if not blocks:
        raise UserError(f"{type(model).__name__} has no decoder blocks that spmd-rl can find (model.layers or "
                        "_no_split_modules) to compile: set model.compile=false for this model")
    for block in blocks:
        block.compile()
    return model


def wrap_decoder_blocks(model: nn.Module, *, compile: bool, activation_checkpointing: bool) -> nn.Module:
    """``torch.compile`` then activation checkpointing of each block (``model.compile``,
    ``<section>.activation_checkpointing``); call after tensor parallelism, before FSDP."""
    if compile:
        apply_compile(model)
    return apply_ac(model, ac_mode(activation_checkpointing))
