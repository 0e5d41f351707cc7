"""Trainer weights into the engine's decoder: bucketed copies, or zero-copy parameter sharing.

Bucketed copy: the incoming ``(name, tensor)`` stream (a one-shot generator that may gather
each tensor from shards as it goes) is consumed tensor by tensor; tensors are held until a
bucket of ``bucket_bytes`` is full, then copied into the parameters with one fused multi-tensor
copy and released. Since a generator materialises a tensor before the consumer sees it, the
bucket is flushed *before* asking for the next tensor whenever that tensor (predicted from the
model's own parameter order, which is the order ``named_parameters`` yields on the trainer
side) would not fit beside what is held. So at most one bucket of incoming tensors is alive
at once, or a single tensor when it alone is bigger than a bucket.

Sharing: when the trainer's module is unsharded and in the engine's dtype, the engine's
decoder can hold the trainer's very Parameter objects; an optimizer step then updates both,
and there is nothing to copy.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from spmd_rl.rollout.weight_sync import clean_param_name

try:  # torch builds without distributed support have no DTensor
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    DTensor = None


@torch.no_grad()
def load_in_buckets(
    model: torch.nn.Module,
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    bucket_bytes: int,
    *,
    tied_lm_head: bool = False,
) -> int:
    """Copy full tensors into ``model``'s parameters by name, a bucket at a time. Returns the
    number of buckets flushed.

    ValueError for a name the model does not have or a shape mismatch. With ``tied_lm_head``
    an incoming ``lm_head.weight`` is the embedding itself and is skipped when the model does
    not list it separately.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    order = [name for name, _ in model.named_parameters()]
    following = dict(zip(order, order[1:]))  # name -> name expected next
    held_params: list[torch.Tensor] = []
    held_tensors: list[torch.Tensor] = []
    held_bytes, flushes = 0, 0

    def flush() -> None:
        nonlocal held_bytes, flushes
        if held_params:
            _copy_all(held_params, held_tensors)
            flushes += 1
        held_params.clear()
        held_tensors.clear()  # the bucket's tensors are freed here (the caller kept no reference)
        held_bytes = 0

    for name, tensor in named_tensors:
        param = params.get(name)
        if param is None:
            if name == "lm_head.weight" and tied_lm_head:
                del tensor
                continue
            raise ValueError(f"update_weights: the model has no parameter named {name!r}")
        if param.shape != tensor.shape:
            raise ValueError(
                f"update_weights: {name!r} has shape {tuple(tensor.shape)}, the model expects {tuple(param.shape)}"
            )
        held_params.append(param)
        held_tensors.append(tensor)
        held_bytes += tensor.numel() * tensor.element_size()
        nxt = following.get(name)
        expected = params[nxt].numel() * tensor.element_size() if nxt is not None else 0
        del tensor  # only the bucket holds it now
        if held_bytes + expected > bucket_bytes:
            flush()
    flush()
    return flushes


def _copy_all(params: list[torch.Tensor], tensors: list[torch.Tensor]) -> None:
    """``params[i].copy_(tensors[i])`` for all i: one fused copy when every pair shares a device
    (dtype casts included), else one copy per tensor. A tensor-parallel (DTensor) parameter
    takes its own slice of the full tensor."""
    if DTensor is not None and any(isinstance(p, DTensor) for p in params):
        from spmd_rl.distributed.tensor_parallel import full_to_local

        params, tensors = map(list, zip(*(full_to_local(p, t) for p, t in zip(params, tensors))))
    if all(p.device == t.device for p, t in zip(params, tensors)):
        torch._foreach_copy_(params, tensors)
    else:
        for p, t in zip(params, tensors):
            p.copy_(t, non_blocking=True)


def share_parameters(model: torch.nn.Module, source: torch.nn.Module) -> None:
    """Make every parameter of ``model`` the same Parameter object as ``source``'s of the same
    name (wrapper prefixes ignored), so both modules read one copy of the weights.

    Valid only for an unsharded ``source`` (no FSDP/TP DTensors) whose parameters have the
    shapes of ``model``'s; ValueError otherwise. ``model`` may live on the meta device: it
    holds no weight memory of its own afterwards.
    """
    shared = {clean_param_name(n): p for n, p in source.named_parameters(remove_duplicate=False)}
    for name, param in list(model.named_parameters(remove_duplicate=False)):
        src = shared.get(name)
        if src is None:
            raise ValueError(f"share_weights_with: the trainer's module has no parameter named {name!r}; "
                             "pass the unwrapped decoder of the same architecture")
        if DTensor is not None and isinstance(src, DTensor):
            raise ValueError(f"share_weights_with needs an unsharded module, but {name!r} is sharded (FSDP/TP); "
                             "leave share_weights_with unset to copy weights in buckets instead")
        if src.shape != param.shape:
            raise ValueError(f"share_weights_with: {name!r} has shape {tuple(src.shape)}, the engine's model "
                             f"expects {tuple(param.shape)}")
        owner, _, attr = name.rpartition(".")
        model.get_submodule(owner)._parameters[attr] = src


def check_still_shared(model: torch.nn.Module, source: torch.nn.Module) -> None:
    """ValueError when ``source`` no longer holds the Parameter objects ``model`` took from it
    (e.g. FSDP's ``fully_shard`` or a re-load replaced them after sharing): the engine would
    silently generate with stale weights."""
    current = {clean_param_name(n): p for n, p in source.named_parameters(remove_duplicate=False)}
    for name, param in model.named_parameters(remove_duplicate=False):
        if current.get(name) is not param:
            raise ValueError(f"share_weights_with: the trainer's {name!r} is no longer the tensor the engine shares "
                             "(sharded or replaced after the engine was built); build the engine without "
                             "share_weights_with to copy weights instead")
