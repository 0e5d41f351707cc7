"""ZeRO-1 for the megatron backend: AdamW state sharded over data parallel
(``actor.megatron.use_distributed_optimizer``, as megatron-core's DistributedOptimizer).

The dp replicas of a TP x PP shard hold the same parameters, and without sharding each also
holds the same AdamW moments (8 bytes per parameter). Here a stage's trainable parameters
become views into one flat fp32 buffer, cut into dp contiguous ranges of ``ceil(N / dp)``
elements (torch.chunk's split); dp rank r owns range r:

1. backward accumulates straight into a flat gradient buffer the parameters' ``.grad`` view
   (allocated for the update only);
2. the buffer is reduce-scattered over dp in place: a rank gets the dp-sum of its own range;
3. the global norm sums the squares of the owned range's elements that count once
   (:func:`.grads.counted_once`), over dp and then over the TP x PP group;
4. AdamW steps the owned range (elementwise, so the numbers equal an unsharded step);
5. an all-gather over dp (in place) refills the flat buffer, so every parameter view is current.

Per rank: parameters N + gradients N during an update (as before) + moments 2N/dp.

Checkpoints store the moments as 1-D DTensors of the unpadded length N sharded over the dp
mesh (torch.chunk's split again), so DCP reshards them when a run resumes on another dp size.
Their state dict is saved as ``<model>/optim_dp_sharded`` (not ``/optim``), so a checkpoint
says which layout its optimizer state has (``checkpoint.check_optimizer_layout``).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from spmd_rl.config import OptimConfig
from spmd_rl.models.megatron.grads import counted_once

STATE_KEY = "optim_dp_sharded"  # the checkpoint's name for this optimizer's state dict


class ShardedAdamW(torch.optim.AdamW):
    """AdamW over this dp rank's range of ``model``'s flattened trainable parameters.

    It is a torch optimizer (LR schedulers drive it as any other) whose single parameter is the
    owned range; :meth:`reduce_grads` must run between the backward passes and :meth:`step`.
    The gradient buffer exists during an update only: :meth:`allocate_grads` before the first
    backward, :meth:`release_grads` after the last step (so it holds no memory while generating)."""

    STATE_KEY = STATE_KEY

    def __init__(self, model: nn.Module, cfg: OptimConfig, dp_mesh, *, tp_rank: int, skip_tied_copy: bool):
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("ShardedAdamW: the model has no trainable parameters")
        dtypes = {p.dtype for _, p in named}
        if dtypes != {torch.float32}:
            raise ValueError(f"ShardedAdamW keeps fp32 master weights in place; got parameters of {sorted(map(str, dtypes))}")
        self.params = [p for _, p in named]
        self.dp_mesh = dp_mesh
        self.dp_group = dp_mesh.get_group()
        self.dp_size = dp_mesh.size()
        self.dp_rank = dp_mesh.get_local_rank()
        self.numel = sum(p.numel() for p in self.params)
        self.chunk = math.ceil(self.numel / self.dp_size)
        self.start = self.dp_rank * self.chunk
        self.owned = max(0, min(self.chunk, self.numel - self.start))  # the rest of the range is padding
        flat = torch.zeros(self.chunk * self.dp_size, dtype=torch.float32, device=self.params[0].device)
        offset = 0
        for p in self.params:
            flat[offset : offset + p.numel()].view_as(p).copy_(p.detach())
            offset += p.numel()
        shard = nn.Parameter(flat[self.start : self.start + self.chunk])  # a view: steps write through
        self.shard = shard
        self._point_params_at(flat)  # the parameters now live in the flat buffer
        self.flat_grad: torch.Tensor | None = None
        self.grad_views: list[torch.Tensor | None] = []
        self.allocate_grads()
        self.counted = _counted_ranges(named, self.start, self.chunk, tp_rank, skip_tied_copy)
        super().__init__([shard], lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay,
                         fused=flat.device.type == "cuda" or None)
        # After every step (skipped ones excepted), the ranges go back to every rank. A hook, not
        # an override of step(): torch wraps step() for its hooks and profiler ranges once.
        self.register_step_post_hook(lambda optimizer, args, kwargs: optimizer._all_gather())

    def allocate_grads(self) -> None:
        """A zeroed flat gradient buffer, the parameters' ``.grad`` views into it (autograd then
        accumulates in place)."""
        if self.flat_grad is None:
            self._point_grads_at(torch.zeros_like(self.flat))

    def release_grads(self) -> None:
        """Drop the gradient buffer (between updates)."""
        self._point_grads_at(None)

    @torch.no_grad()
    def reduce_grads(self) -> None:
        """Reduce-scatter the flat gradient over dp, in place: the owned range's ``.grad`` is its
        slice of the buffer (the other slices hold partial sums afterwards, cleared by zero_grad)."""
        pending = [p.grad for p in self.params]  # views into the buffer, or standalone (no buffer then)
        self.allocate_grads()
        for p, grad, view in zip(self.params, pending, self.grad_views):
            if grad is not None and grad.data_ptr() != view.data_ptr():  # accumulated outside the buffer
                view.add_(grad)
            p.grad = view
        owned = self.flat_grad[self.start : self.start + self.chunk]
        if self.dp_size > 1:
            dist.reduce_scatter_single(owned, self.flat_grad, group=self.dp_group)
        self.shard.grad = owned

    @torch.no_grad()
    def grad_norm(self, model_parallel_group) -> float:
        """L2 norm of the whole model's (dp-summed) gradient, the same on every rank."""
        grad = self.shard.grad
        squares = torch.zeros((), dtype=torch.float64, device=grad.device)
        for lo, hi in self.counted:
            squares += torch.linalg.vector_norm(grad[lo:hi], dtype=torch.float32).double().square()
        if self.dp_size > 1:
            dist.all_reduce(squares, group=self.dp_group)
        dist.all_reduce(squares, group=model_parallel_group)
        return math.sqrt(squares.item())

    @torch.no_grad()
    def clip_grads_(self, total_norm: float, max_norm: float) -> None:
        if max_norm > 0 and math.isfinite(total_norm) and total_norm > max_norm:
            self.shard.grad.mul_(max_norm / (total_norm + 1e-6))

    @torch.no_grad()
    def _all_gather(self) -> None:
        """Every rank's stepped range into the flat parameter buffer (in place: the owned range
        is already there)."""
        if self.dp_size > 1:
            dist.all_gather_single(self.flat, self.flat[self.start : self.start + self.chunk], group=self.dp_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        if self.flat_grad is not None:
            self.flat_grad.zero_()

    # -- host offload (``*.offload.params``: spmd_rl.trainer.offload.HostOffload) -------------------

    def flat_slots(self, device: torch.device) -> list:
        """The parameter buffer and the (cleared) gradient buffer as offload slots; assigning a
        buffer re-points every parameter, the owned range and the gradient views at it."""
        from spmd_rl.trainer.offload import _Slot

        if self.flat.device != device:
            return []
        if self.shard.grad is not None:
            raise ValueError("ShardedAdamW: offload between updates (after zero_grad), not inside one")
        slots = [_Slot(("flat_params", id(self)), self.flat, self._point_params_at)]
        if self.flat_grad is not None:  # all zeros after zero_grad: dropped, not copied
            slots.append(_Slot(("flat_grads", id(self)), self.flat_grad, self._point_grads_at, zeros=True))
        return slots

    def _point_params_at(self, flat: torch.Tensor) -> None:
        self.flat = flat
        offset = 0
        for p in self.params:
            p.data = flat[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        self.shard.data = flat[self.start : self.start + self.chunk]

    def _point_grads_at(self, flat_grad: torch.Tensor | None) -> None:
        """``None``: drop the gradient buffer (while offloaded); a tensor: use it."""
        self.flat_grad = flat_grad
        self.grad_views = []
        offset = 0
        for p in self.params:
            view = None if flat_grad is None else flat_grad[offset : offset + p.numel()].view_as(p)
            self.grad_views.append(view)
            p.grad = view
            offset += p.numel()

    # -- checkpoints -----------------------------------------------------------------------------

    def sharded_state_dict(self) -> dict:
        """The moments as 1-D DTensors over the dp mesh (views: DCP loads into them in place),
        the step count and the learning rate."""
        state = self._moments()
        out = {key: DTensor.from_local(state[key][: self.owned], self.dp_mesh, [Shard(0)], run_check=False,
                                       shape=torch.Size([self.numel]), stride=(1,))
               for key in ("exp_avg", "exp_avg_sq")}
        out["step"] = state["step"]
        out["lr"] = torch.tensor(float(self.param_groups[0]["lr"]), dtype=torch.float64)
        return out

    def load_sharded_state_dict(self, loaded: dict) -> None:
        """Take what DCP loaded into :meth:`sharded_state_dict`'s tensors."""
        state = self._moments()
        for key in ("exp_avg", "exp_avg_sq"):
            local = loaded[key].to_local() if isinstance(loaded[key], DTensor) else loaded[key]
            if local.data_ptr() != state[key].data_ptr():
                state[key][: self.owned].copy_(local)
        if loaded["step"] is not state["step"]:
            state["step"].copy_(loaded["step"])
        self.param_groups[0]["lr"] = float(loaded["lr"])

    def _moments(self) -> dict:
        """AdamW's state of the owned range, created (zeros, step 0) before the first step, in
        the layout ``torch.optim.AdamW`` would create it."""
        state = self.state[self.shard]
        if not state:
            group = self.param_groups[0]
            on_device = group["fused"] or group["capturable"]
            state["step"] = torch.zeros((), dtype=torch.float32, device=self.shard.device if on_device else "cpu")
            state["exp_avg"] = torch.zeros_like(self.shard, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(self.shard, memory_format=torch.preserve_format)
        return state


def _counted_ranges(named, start: int, chunk: int, tp_rank: int, skip_tied_copy: bool) -> list[tuple[int, int]]:
    """Ranges, relative to the owned range ``[start, start + chunk)``, of the elements whose
    parameter counts once in the global norm."""
    ranges, offset = [], 0
    for name, p in named:
        lo, hi = max(offset, start), min(offset + p.numel(), start + chunk)
        if lo < hi and counted_once(name, p, tp_rank, skip_tied_copy):
            ranges.append((lo - start, hi - start))
        offset += p.numel()
    return ranges
