"""Trainer layout -> generation layout: stream the policy's full parameters into an engine.

The trainer's module may be sharded (FSDP2 / TP DTensors) and wrapped (``torch.compile``,
activation checkpointing); the engine wants plain tensors under HF parameter names. Tensors are
yielded one at a time so at most one gathered parameter is alive beyond the engine's own copy.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from spmd_rl.rollout.engine import RolloutEngine

try:  # torch builds without distributed support have no DTensor
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    DTensor = None

# Inserted into parameter names by torch.compile, FSDP1 and checkpoint_wrapper respectively.
WRAPPER_PREFIXES = ("_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def clean_param_name(name: str) -> str:
    """Drop wrapper components from a dotted parameter name (anywhere they occur)."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def iter_full_tensors(module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, full tensor)`` for each parameter of ``module``, names cleaned of wrappers.

    A DTensor parameter is gathered with ``.full_tensor()`` (a collective: every rank of its mesh
    must iterate in the same order, which ``named_parameters`` guarantees). Tied parameters are
    yielded once, under their first name.
    """
    for name, param in module.named_parameters():
        tensor = param.detach()
        if DTensor is not None and isinstance(tensor, DTensor):
            tensor = tensor.full_tensor()
        yield clean_param_name(name), tensor


def sync_weights(policy_module: torch.nn.Module, engine: RolloutEngine) -> None:
    """Push the policy's current weights into ``engine`` (call on every rank)."""
    engine.update_weights(iter_full_tensors(policy_module))
