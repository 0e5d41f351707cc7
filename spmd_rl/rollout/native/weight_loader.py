"""Trainer weights into the engine's decoder: bucketed copies, or zero-copy parameter sharing.

Bucketed copy: the incoming ``(name, tensor)`` stream (a one-shot generator that may gather
each tensor from shards as it goes) is consumed tensor by tensor; tensors are held until a
bucket of ``bucket_bytes`` is full, then copied into the parameters with one fused multi-tensor
copy and released. Since a generator materialises a tensor before the consumer sees it, the
bucket is flushed *before* asking for the next tensor whenever that tensor (predicted from the
model's own parameter order, which is the order ``named_parameters`` yields on the trainer
side) would not fit beside what is held. So at most one bucket of incoming tensors is alive
at once, or a single tensor when it alone is bigger than a bucket.

Sharing: when every trainer parameter is whole on this rank and in the engine's dtype, the
engine's decoder reads the trainer's storage: the very Parameter objects of a plain module, or
the local tensors of FSDP2 DTensors whose one shard is the whole tensor (a 1-rank FSDP mesh, or
HSDP with ``dp_shard=1``). The optimizer updates that storage in place, so there is nothing to
copy.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from spmd_rl.rollout.weight_sync import clean_param_name

try:  # torch builds without distributed support have no DTensor / FSDP2
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    DTensor = FSDPModule = None


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

    ValueError for a name the model does not have, a shape mismatch, or a stream that ends
    before every parameter arrived (the rest would keep stale weights). With ``tied_lm_head``
    an incoming ``lm_head.weight`` is the embedding itself and is skipped when the model does
    not list it separately.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    order = [name for name, _ in model.named_parameters()]
    following = dict(zip(order, order[1:]))  # name -> name expected next
    held_params: list[torch.Tensor] = []
    held_tensors: list[torch.Tensor] = []
    held_bytes, flushes = 0, 0
    missing = set(order)

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
        missing.discard(name)
        held_params.append(param)
        held_tensors.append(tensor)
        held_bytes += tensor.numel() * tensor.element_size()
        nxt = following.get(name)
        expected = params[nxt].numel() * tensor.element_size() if nxt is not None else 0
        del tensor  # only the bucket holds it now
        if held_bytes + expected > bucket_bytes:
            flush()
    flush()
    if missing:
        first = next(name for name in order if name in missing)
        raise ValueError(f"update_weights: the stream ended without {len(missing)} of the model's {len(order)} "
                         f"parameters (first: {first!r}); send every parameter, or the engine generates from "
                         "stale weights")
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
    """Make every parameter of ``model`` read the storage of ``source``'s parameter of the same
    name (wrapper prefixes ignored), so both modules use one copy of the weights.

    A plain source parameter is taken as is (the same Parameter object). An FSDP2/DTensor one is
    valid only when its local tensor is the whole parameter; ``model`` then gets a Parameter
    over that local tensor, which the trainer's optimizer updates in place. ValueError for a
    real shard (FSDP over several ranks, TP), a missing name or another shape. ``model`` may
    live on the meta device: it holds no weight memory of its own afterwards.
    """
    reshard_fsdp(source)
    shared = {clean_param_name(n): p for n, p in source.named_parameters(remove_duplicate=False)}
    taken: dict[int, torch.nn.Parameter] = {}  # id(source param) -> engine param: tied weights stay tied
    for name, param in list(model.named_parameters(remove_duplicate=False)):
        src = shared.get(name)
        if src is None:
            raise ValueError(f"share_weights_with: the trainer's module has no parameter named {name!r}; "
                             "pass the unwrapped decoder of the same architecture")
        if src.shape != param.shape:
            raise ValueError(f"share_weights_with: {name!r} has shape {tuple(src.shape)}, the engine's model "
                             f"expects {tuple(param.shape)}")
        if id(src) not in taken:
            taken[id(src)] = _engine_view(name, src)
        owner, _, attr = name.rpartition(".")
        model.get_submodule(owner)._parameters[attr] = taken[id(src)]


def _engine_view(name: str, src: torch.Tensor) -> torch.Tensor:
    """What the engine holds for the trainer's ``src``: itself when plain, a no-grad Parameter
    over its local tensor (same storage) when it is a DTensor holding the whole tensor."""
    if DTensor is None or not isinstance(src, DTensor):
        return src
    local = src.to_local()
    if local.shape != src.shape:
        raise ValueError(f"share_weights_with needs every parameter whole on this rank, but {name!r} is sharded "
                         f"(local {tuple(local.shape)} of {tuple(src.shape)}: FSDP over several ranks or TP); "
                         "leave share_weights_with unset to copy weights in buckets instead")
    return torch.nn.Parameter(local.detach(), requires_grad=False)


def check_still_shared(model: torch.nn.Module, source: torch.nn.Module) -> None:
    """ValueError when ``source`` no longer holds the storage ``model`` took from it (e.g. FSDP's
    ``fully_shard``, a re-load or a host offload replaced it after sharing): the engine would
    silently generate with stale weights.

    Plain parameters must be the same objects; DTensor ones must still have a local tensor at
    the engine parameter's address and shape. FSDP2 units are resharded first (see
    :func:`reshard_fsdp`)."""
    reshard_fsdp(source)
    current = {clean_param_name(n): p for n, p in source.named_parameters(remove_duplicate=False)}
    for name, param in model.named_parameters(remove_duplicate=False):
        if not _reads(param, current.get(name)):
            raise ValueError(f"share_weights_with: the trainer's {name!r} is no longer the tensor the engine shares "
                             "(sharded or replaced after the engine was built); build the engine without "
                             "share_weights_with to copy weights instead")


def _reads(param: torch.Tensor, src: torch.Tensor | None) -> bool:
    """Whether the engine's ``param`` still reads the trainer's ``src``."""
    if DTensor is not None and isinstance(src, DTensor):
        local = src.to_local()
        return local.data_ptr() == param.data_ptr() and local.shape == param.shape
    return src is param


def reshard_fsdp(module: torch.nn.Module) -> None:
    """Put every FSDP2 unit of ``module``'s tree back in the sharded state, so that
    ``named_parameters`` yields the sharded DTensors again. After a forward without backward the
    root and the last block keep plain, gathered parameters (and their memory, which generation
    wants back); the root may sit above ``module`` (the trainer's policy wraps the decoder), so it
    is reached through the state all units share after the first forward: private API of torch
    2.13 (``FSDPState._state_ctx.all_states``, ``_fsdp_param_groups``). A no-op for plain modules."""
    if FSDPModule is None:
        return
    units = [m for m in module.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.reshard()
    if units:
        for state in units[0]._get_fsdp_state()._state_ctx.all_states:
            for group in state._fsdp_param_groups:
                group.reshard()
