"""Move a model's parameter shards and an optimizer's state to host memory and back.

While the rollout engine generates, the trainer's parameters and AdamW moments sit idle on the
device; ``actor.offload`` / ``critic.offload`` copy them into host buffers so the KV cache can
use that memory, and copy them back before the next logprob pass (verl's param/optimizer offload,
done here with explicit, reused buffers).

Contract (what the tests check):

* :meth:`HostOffload.offload` copies every tracked device tensor into a host buffer and re-points
  the model/optimizer at that buffer; nothing keeps the device tensor alive afterwards, so its
  memory returns to the allocator. It returns the bytes moved.
* :meth:`HostOffload.reload` copies each host buffer into a *fresh* device tensor and re-points
  the model/optimizer at it; the host buffers stay allocated and are reused by the next
  :meth:`offload` (pinned when CUDA is available, so both copies are asynchronous DMA).
* Values are bit-exact (plain copies) and Python objects keep their identity: the optimizer's
  parameter references, FSDP's bookkeeping and the DTensor wrappers are untouched, only the
  local storage under them changes.

The megatron backend's ZeRO-1 optimizer (``models/megatron/distributed_optimizer.py``) owns one
flat buffer that its model's parameters view; it stands in the modules list and hands out that
buffer (re-pointing every view on assignment) and its gradient buffer, which is all zeros
between updates and so is dropped and recreated rather than copied.

Where the storage lives (what was found to work with FSDP2): a ``fully_shard``-ed parameter is an
``nn.Parameter`` wrapping a DTensor whose ``_local_tensor`` is a view of ``FSDPParam
._sharded_param_data``, the flat (padded) shard FSDP all-gathers from. Both must move together,
and the view's geometry is rebuilt on the new flat tensor with ``as_strided`` (FSDP's own
``reset_sharded_param`` does the same assignments after ``module.to()``). ``param.data = t`` would
replace the DTensor wrapper's storage but not FSDP's flat shard, which would keep the device
memory alive and all-gather stale values. Plain parameters use ``param.data = t``; AdamW state
tensors (DTensors under FSDP) get their ``_local_tensor`` replaced, plain ones their dict entry.
A tensor is moved only if it lives on the compute device: AdamW's ``step`` counter stays on the
CPU where non-capturable AdamW keeps it.

On a CPU-only machine the compute device and ``host_device`` are both the CPU: the copies still
happen (into separate buffers), which exercises the whole path but saves no memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

try:  # torch builds without distributed support have no DTensor / FSDP2
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    FSDPModule = DTensor = None


@dataclass
class _Slot:
    """One device tensor the model or optimizer holds, and how to re-point its holder."""

    key: tuple  # stable identity of the holder, to find the same host buffer next time
    tensor: torch.Tensor | None  # the tensor to move (contiguous)
    assign: Callable[[torch.Tensor | None], None]  # re-point the holder at a tensor like ``tensor``
    zeros: bool = False  # all zeros (a cleared gradient buffer): dropped (assign(None)), reloaded as zeros
    shape: torch.Size = torch.Size()
    dtype: torch.dtype = torch.float32

    def __post_init__(self):
        self.shape, self.dtype = self.tensor.shape, self.tensor.dtype


class HostOffload:
    """Offload/reload the parameters of ``modules`` and the state of ``optimizers``.

    Args:
        modules: models whose parameters move (FSDP2-sharded or plain).
        optimizers: optimizers whose state tensors move (``exp_avg``, ``exp_avg_sq`` ...).
        device: the compute device the tensors live on while in use.
        host_device: where they wait; must be a CPU device.
        pin_memory: page-locked host buffers; default: when CUDA is available.
        frozen: the tensors never change (a reference model): once the host buffers hold them,
            :meth:`offload` only drops the device copies.
    """

    def __init__(self, modules: list[nn.Module] = (), optimizers: list[torch.optim.Optimizer] = (), *,
                 device: torch.device | str, host_device: torch.device | str = "cpu",
                 pin_memory: bool | None = None, frozen: bool = False):
        self.modules = list(modules)
        self.frozen = frozen
        self.optimizers = list(optimizers)
        self.device = torch.device(device)
        self.host_device = torch.device(host_device)
        if self.host_device.type != "cpu":
            raise ValueError(f"host_device must be a CPU device (host memory), got {self.host_device}; valid: cpu")
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._buffers: dict[tuple, torch.Tensor] = {}  # slot key -> host buffer, reused every step
        self._moved: list[_Slot] | None = None  # slots now on the host (None = on the device)

    @property
    def active(self) -> bool:
        """Something is configured to move."""
        return bool(self.modules or self.optimizers)

    @property
    def offloaded(self) -> bool:
        return self._moved is not None

    def host_bytes(self) -> int:
        """Bytes of host buffers held (allocated at the first offload, then reused)."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    @torch.no_grad()
    def offload(self) -> int:
        """Copy every tracked device tensor to its host buffer and free the device copy; bytes moved."""
        if self._moved is not None:
            raise ValueError("offload() called twice: the state is already in host memory; call reload() first")
        for module in self.modules:
            _reshard(module)  # FSDP's unsharded (gathered) parameters are dropped, its shards registered
        slots = [s for m in self.modules for s in _param_slots(m, self.device)]
        slots += [s for opt in self.optimizers for s in _optimizer_slots(opt, self.device)]
        moved = 0
        for slot in slots:
            if slot.zeros or (self.frozen and self._holds(slot)):
                continue
            host = self._buffer_for(slot)
            host.copy_(slot.tensor, non_blocking=self.pin_memory)
            moved += host.numel() * host.element_size()
        self._synchronize()  # host buffers hold the values before the device tensors are dropped
        for slot in slots:
            slot.assign(None if slot.zeros else self._buffers[slot.key])
            slot.tensor = None  # our reference was the last one: the device memory is free now
        self._moved = slots
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # engines with their own allocator (vLLM, SGLang) can take it
        return moved

    @torch.no_grad()
    def reload(self) -> int:
        """Copy every host buffer into a fresh device tensor and point the holders at it; bytes moved."""
        if self._moved is None:
            raise ValueError("reload() called without offload(): the state is already on the device")
        moved = 0
        for slot in self._moved:
            if slot.zeros:
                slot.assign(torch.zeros(slot.shape, dtype=slot.dtype, device=self.device))
                continue
            host = self._buffers[slot.key]
            fresh = torch.empty(host.shape, dtype=host.dtype, device=self.device)
            fresh.copy_(host, non_blocking=self.pin_memory)
            slot.assign(fresh)
            moved += host.numel() * host.element_size()
        self._synchronize()
        self._moved = None
        return moved

    def _holds(self, slot: _Slot) -> bool:
        buf = self._buffers.get(slot.key)
        return buf is not None and buf.shape == slot.shape and buf.dtype == slot.dtype

    def _buffer_for(self, slot: _Slot) -> torch.Tensor:
        src = slot.tensor
        buf = self._buffers.get(slot.key)
        if buf is None or buf.shape != src.shape or buf.dtype != src.dtype:
            buf = torch.empty(src.shape, dtype=src.dtype, device=self.host_device,
                              pin_memory=self.pin_memory and self.host_device.type == "cpu")
            self._buffers[slot.key] = buf
        return buf

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _reshard(module) -> None:
    if FSDPModule is None or not isinstance(module, nn.Module):
        return
    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def _fsdp_params(module: nn.Module) -> list:
    """FSDP2's per-parameter records (``FSDPParam``) under ``module``; private API of torch 2.13
    (``FSDPState._fsdp_param_groups``)."""
    if FSDPModule is None:
        return []
    found = []
    for m in module.modules():
        if isinstance(m, FSDPModule):
            for group in m._get_fsdp_state()._fsdp_param_groups:
                found.extend(group.fsdp_params)
    return found


def _param_slots(module, device: torch.device) -> list[_Slot]:
    if hasattr(module, "flat_slots"):  # parameters views into one flat buffer (the megatron backend's ZeRO-1)
        return module.flat_slots(device)
    slots, covered = [], set()
    for fsdp_param in _fsdp_params(module):
        param = fsdp_param.sharded_param
        covered.add(id(param))
        if fsdp_param.offload_to_cpu:  # FSDP's own CPU offload (ref.offload): already on the host
            continue
        _check_no_grad(param)
        flat = fsdp_param._sharded_param_data  # [padded local numel], what FSDP all-gathers from
        if flat.device != device:
            continue
        local = param._local_tensor
        if local.numel() and local.untyped_storage().data_ptr() != flat.untyped_storage().data_ptr():
            raise ValueError(f"FSDP parameter {fsdp_param._param_fqn}: its local tensor is not a view of its "
                             "flat shard (changed outside FSDP?); cannot offload it")
        geometry = (local.size(), local.stride(), local.storage_offset() - flat.storage_offset())
        slots.append(_Slot(("fsdp", id(fsdp_param)), flat, _fsdp_assign(fsdp_param, geometry)))
    for name, param in module.named_parameters():
        if id(param) in covered:
            continue
        _check_no_grad(param, name)
        is_dtensor = DTensor is not None and isinstance(param, DTensor)
        data = param._local_tensor if is_dtensor else param.data
        if data.device != device:
            continue
        slots.append(_Slot(("param", id(param)), data.contiguous(), _param_assign(param, is_dtensor)))
    return slots


def _optimizer_slots(optimizer: torch.optim.Optimizer, device: torch.device) -> list[_Slot]:
    slots = []
    for param, state in optimizer.state.items():
        for name, value in state.items():
            if not isinstance(value, torch.Tensor):
                continue
            is_dtensor = DTensor is not None and isinstance(value, DTensor)
            data = value._local_tensor if is_dtensor else value
            if data.device != device:
                continue  # e.g. AdamW's step counter, kept on the CPU
            slots.append(_Slot(("optim", id(param), name), data.contiguous(), _state_assign(state, name, is_dtensor)))
    return slots


def _fsdp_assign(fsdp_param, geometry) -> Callable[[torch.Tensor], None]:
    size, stride, offset = geometry

    def assign(flat: torch.Tensor) -> None:
        fsdp_param._sharded_param_data = flat
        fsdp_param.sharded_param._local_tensor = flat.as_strided(size, stride, offset)
    return assign


def _param_assign(param: nn.Parameter, is_dtensor: bool) -> Callable[[torch.Tensor], None]:
    def assign(tensor: torch.Tensor) -> None:
        if is_dtensor:
            param._local_tensor = tensor
        else:
            param.data = tensor
    return assign


def _state_assign(state: dict, name: str, is_dtensor: bool) -> Callable[[torch.Tensor], None]:
    def assign(tensor: torch.Tensor) -> None:
        if is_dtensor:
            state[name]._local_tensor = tensor
        else:
            state[name] = tensor
    return assign


def _check_no_grad(param: torch.Tensor, name: str = "") -> None:
    if param.grad is not None:
        raise ValueError(f"parameter {name or tuple(param.shape)} still has a gradient: offload after "
                         "optimizer.zero_grad(set_to_none=True) (between updates), not inside one")


def build_host_offload(cfg, components) -> HostOffload:
    """The actor's and the critic's offload as configured (``actor.offload``, ``critic.offload``);
    ``.active`` is False when nothing is set."""
    c = components
    modules, optimizers = [], []
    for section, model, optimizer in ((cfg.actor, c.policy, c.optimizer), (cfg.critic, c.critic, c.critic_optimizer)):
        if model is None:
            continue
        if section.offload.params:  # a ZeRO-1 optimizer owns the flat buffer its model's parameters view
            modules.append(optimizer if hasattr(optimizer, "flat_slots") else model)
        if section.offload.optimizer:
            optimizers.append(optimizer)
    return HostOffload(modules, optimizers, device=c.device)
