"""Activation checkpointing of decoder blocks (Chen et al. 2016, arXiv:1604.06174).

Each block is wrapped with torch's ``checkpoint_wrapper`` (non-reentrant ``torch.utils.checkpoint``):
its forward keeps only the block's inputs, and the backward runs the block's forward again to
rebuild what it needs. Per layer the stored activations drop from ~20 tensors of shape ``[N, *]``
to the block input ``[N, H]`` (see ``trainer/memory_plan.py``), for one extra block forward in
the backward (~1/3 more compute).

Order: tensor parallelism, ``torch.compile``, then this, then FSDP (torchtitan applies both before
FSDP, so that a checkpointed block is also the unit FSDP gathers). The checkpoint wraps the
compiled block rather than the reverse: the packed attention's per-sequence loop graph-breaks,
and a graph break inside a checkpointed region makes dynamo run the whole region eagerly.
Parameter names gain ``_checkpoint_wrapped_module.``; weight sync (``rollout/weight_sync.py``),
DCP state dicts (``get_state_dict``) and the HF export (``get_model_state_dict``) strip it, so
checkpoints with and without checkpointing load into each other.
"""

from __future__ import annotations

from typing import Callable

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

from spmd_rl.distributed.parallelize import decoder_blocks
from spmd_rl.errors import UserError

AC_MODES = ("none", "full")


def apply_ac(model: nn.Module, mode: str) -> nn.Module:
    """Checkpoint every decoder block of ``model`` in place (``mode="full"``) or leave it
    (``"none"``); returns ``model``. ``model`` is a decoder or a ``PolicyModel``/``ValueModel``."""
    if mode not in AC_MODES:
        raise ValueError(f"activation checkpointing mode {mode!r} is not one of {', '.join(AC_MODES)}")
    if mode == "full":
        wrap_blocks(model, lambda block: checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT))
    return model


def ac_mode(enabled: bool) -> str:
    """The mode of a config's ``activation_checkpointing`` flag."""
    return "full" if enabled else "none"


def wrap_blocks(model: nn.Module, wrap: Callable[[nn.Module], nn.Module]) -> None:
    """Replace each decoder block by ``wrap(block)`` inside the ``nn.ModuleList`` holding it, so
    the decoder's ``for layer in layers`` loop calls the wrapper."""
    blocks = decoder_blocks(model)
    if not blocks:
        raise UserError(f"{type(model).__name__} has no decoder blocks that spmd-rl can find (model.layers or "
                        "_no_split_modules) to checkpoint: set *.activation_checkpointing=false for this model")
    container = next((m for m in model.modules() if isinstance(m, nn.ModuleList) and any(b is blocks[0] for b in m)),
                      None)
    if container is None:
        raise UserError(f"the decoder blocks of {type(model).__name__} are not held in an nn.ModuleList: set "
                        "*.activation_checkpointing=false and model.compile=false for this model")
    for name, block in list(container.named_children()):
        container.register_module(name, wrap(block))
