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

Under expert parallelism (``parallel.ep``) the experts' gradients are summed over another group
than the rest's: the dp ranks that hold the same experts (megatron's expert-data-parallel group,
dp / ep ranks). So the experts get a flat buffer of their own, cut over that group, and their
squares enter the norm over it and the expert-model-parallel group (EP x PP); each step covers
both ranges. This is megatron-core's split of its distributed optimizer's buffers too.

Checkpoints store the moments as 1-D DTensors of the unpadded length N sharded over the dp
mesh (torch.chunk's split again), so DCP reshards them when a run resumes on another dp size;
the experts' (per ep rank) over the expert-data-parallel mesh (:meth:`ShardedAdamW.checkpoint_state`).
Their state dict is saved as ``<model>/optim_dp_sharded`` (not ``/optim``), so a checkpoint
says which layout its optimizer state has (``checkpoint.check_optimizer_layout``).
"""

from __future__ import annotations

import math
import re

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from spmd_rl.config import OptimConfig
from spmd_rl.models.megatron.grads import counted_once
from spmd_rl.models.megatron.names import is_expert_param

STATE_KEY = "optim_dp_sharded"  # the checkpoint's name for this optimizer's state dict
_MOMENTS = ("exp_avg", "exp_avg_sq")


class FlatBuffer:
    """Parameters that share one data-parallel group, as views into one flat fp32 buffer cut into
    ``size`` ranges of ``ceil(N / size)`` elements; this rank owns range ``rank`` (module doc)."""

    def __init__(self, named: list, mesh, *, tp_rank: int, skip_tied_copy: bool):
        self.params = [p for _, p in named]
        self.mesh, self.group, self.size, self.rank = mesh, mesh.get_group(), mesh.size(), mesh.get_local_rank()
        self.numel = sum(p.numel() for p in self.params)
        self.chunk = math.ceil(self.numel / self.size)
        self.start = self.rank * self.chunk
        self.owned = max(0, min(self.chunk, self.numel - self.start))  # the rest of the range is padding
        flat = torch.zeros(self.chunk * self.size, dtype=torch.float32, device=self.params[0].device)
        offset = 0
        for p in self.params:
            flat[offset : offset + p.numel()].view_as(p).copy_(p.detach())
            offset += p.numel()
        self.shard = nn.Parameter(flat[self.start : self.start + self.chunk])  # a view: steps write through
        self.point_params_at(flat)  # the parameters now live in the flat buffer
        self.flat_grad: torch.Tensor | None = None
        self.grad_views: list[torch.Tensor | None] = []
        self.counted = _counted_ranges(named, self.start, self.chunk, tp_rank, skip_tied_copy)

    def allocate_grads(self) -> None:
        if self.flat_grad is None:
            self.point_grads_at(torch.zeros_like(self.flat))

    @torch.no_grad()
    def reduce_grads(self) -> None:
        """Reduce-scatter the flat gradient over the group, in place (see ShardedAdamW)."""
        pending = [p.grad for p in self.params]  # views into the buffer, or standalone (no buffer then)
        self.allocate_grads()
        for p, grad, view in zip(self.params, pending, self.grad_views):
            if grad is not None and grad.data_ptr() != view.data_ptr():  # accumulated outside the buffer
                view.add_(grad)
            p.grad = view
        owned = self.flat_grad[self.start : self.start + self.chunk]
        if self.size > 1:
            dist.reduce_scatter_single(owned, self.flat_grad, group=self.group)
        self.shard.grad = owned

    @torch.no_grad()
    def owned_squares(self) -> torch.Tensor:
        """Sum of squares of the counted elements of the (reduced) owned range, over the group."""
        grad = self.shard.grad
        squares = torch.zeros((), dtype=torch.float64, device=grad.device)
        for lo, hi in self.counted:
            squares += torch.linalg.vector_norm(grad[lo:hi], dtype=torch.float32).double().square()
        if self.size > 1:
            dist.all_reduce(squares, group=self.group)
        return squares

    @torch.no_grad()
    def all_gather(self) -> None:
        """Every rank's stepped range into the flat parameter buffer (in place)."""
        if self.size > 1:
            dist.all_gather_single(self.flat, self.flat[self.start : self.start + self.chunk], group=self.group)

    def point_params_at(self, flat: torch.Tensor) -> None:
        self.flat = flat
        offset = 0
        for p in self.params:
            p.data = flat[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        self.shard.data = flat[self.start : self.start + self.chunk]

    def point_grads_at(self, flat_grad: torch.Tensor | None) -> None:
        """``None``: drop the gradient buffer (between updates, while offloaded); a tensor: use it."""
        self.flat_grad = flat_grad
        self.grad_views = []
        offset = 0
        for p in self.params:
            view = None if flat_grad is None else flat_grad[offset : offset + p.numel()].view_as(p)
            self.grad_views.append(view)
            p.grad = view
            offset += p.numel()


class ShardedAdamW(torch.optim.AdamW):
    """AdamW over this rank's ranges of ``model``'s flattened trainable parameters: one
    :class:`FlatBuffer` over ``dp_mesh``, and under expert parallelism (``expert_dp_mesh``) one
    of the experts over it (module doc).

    It is a torch optimizer (LR schedulers drive it as any other) whose parameters are the owned
    ranges; :meth:`reduce_grads` must run between the backward passes and :meth:`step`. The
    gradient buffers exist during an update only: :meth:`allocate_grads` before the first
    backward, :meth:`release_grads` after the last step (so they hold no memory while generating)."""

    STATE_KEY = STATE_KEY

    def __init__(self, model: nn.Module, cfg: OptimConfig, dp_mesh, *, tp_rank: int, skip_tied_copy: bool,
                 expert_dp_mesh=None, expert_norm_group=None):
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("ShardedAdamW: the model has no trainable parameters")
        dtypes = {p.dtype for _, p in named}
        if dtypes != {torch.float32}:
            raise ValueError(f"ShardedAdamW keeps fp32 master weights in place; got parameters of {sorted(map(str, dtypes))}")
        experts = [(n, p) for n, p in named if is_expert_param(n)] if expert_dp_mesh is not None else []
        dense = [(n, p) for n, p in named if not (experts and is_expert_param(n))]
        self.dp_mesh = dp_mesh
        # Under expert parallelism the experts' squares are summed over this group (EP x PP) on
        # every rank, also on a pipeline stage without sparse layers (it adds a zero).
        self.expert_norm_group = expert_norm_group
        self.buckets = [FlatBuffer(dense, dp_mesh, tp_rank=tp_rank, skip_tied_copy=skip_tied_copy)]
        if experts:
            self.buckets.append(FlatBuffer(experts, expert_dp_mesh, tp_rank=tp_rank, skip_tied_copy=skip_tied_copy))
        self.allocate_grads()
        device = self.buckets[0].flat.device
        super().__init__([b.shard for b in self.buckets], lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                         weight_decay=cfg.weight_decay, fused=device.type == "cuda" or None)
        # After every step (skipped ones excepted), the ranges go back to every rank. A hook, not
        # an override of step(): torch wraps step() for its hooks and profiler ranges once.
        self.register_step_post_hook(lambda optimizer, args, kwargs: optimizer._all_gather())

    def allocate_grads(self) -> None:
        """Zeroed flat gradient buffers, the parameters' ``.grad`` views into them (autograd then
        accumulates in place)."""
        for bucket in self.buckets:
            bucket.allocate_grads()

    def release_grads(self) -> None:
        """Drop the gradient buffers (between updates)."""
        for bucket in self.buckets:
            bucket.point_grads_at(None)

    @torch.no_grad()
    def reduce_grads(self) -> None:
        """Reduce-scatter each flat gradient over its group, in place: an owned range's ``.grad`` is
        its slice of the buffer (the other slices hold partial sums afterwards, cleared by zero_grad)."""
        for bucket in self.buckets:
            bucket.reduce_grads()

    @torch.no_grad()
    def grad_norm(self, model_parallel_group) -> float:
        """L2 norm of the whole model's (dp-summed) gradient, the same on every rank: the dense
        squares over ``model_parallel_group`` (TP x PP), the experts' over ``expert_norm_group``."""
        dense = self.buckets[0].owned_squares()
        dist.all_reduce(dense, group=model_parallel_group)
        total = dense.item()
        if self.expert_norm_group is not None:
            experts = self.buckets[1].owned_squares() if len(self.buckets) > 1 else torch.zeros_like(dense)
            dist.all_reduce(experts, group=self.expert_norm_group)
            total += experts.item()
        return math.sqrt(total)

    @torch.no_grad()
    def clip_grads_(self, total_norm: float, max_norm: float) -> None:
        if max_norm > 0 and math.isfinite(total_norm) and total_norm > max_norm:
            for bucket in self.buckets:
                bucket.shard.grad.mul_(max_norm / (total_norm + 1e-6))

    @torch.no_grad()
    def _all_gather(self) -> None:
        for bucket in self.buckets:
            bucket.all_gather()

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for bucket in self.buckets:
            if bucket.flat_grad is not None:
                bucket.flat_grad.zero_()

    # -- host offload (``*.offload.params``: spmd_rl.trainer.offload.HostOffload) -------------------

    def flat_slots(self, device: torch.device) -> list:
        """Each parameter buffer and (cleared) gradient buffer as offload slots; assigning a
        buffer re-points every parameter, the owned range and the gradient views at it."""
        from spmd_rl.trainer.offload import _Slot

        slots = []
        for bucket in self.buckets:
            if bucket.flat.device != device:
                continue
            if bucket.shard.grad is not None:
                raise ValueError("ShardedAdamW: offload between updates (after zero_grad), not inside one")
            slots.append(_Slot(("flat_params", id(bucket)), bucket.flat, bucket.point_params_at))
            if bucket.flat_grad is not None:  # all zeros after zero_grad: dropped, not copied
                slots.append(_Slot(("flat_grads", id(bucket)), bucket.flat_grad, bucket.point_grads_at, zeros=True))
        return slots

    # -- checkpoints -----------------------------------------------------------------------------

    def checkpoint_state(self, name: str) -> dict[str, dict]:
        """``{state dict name: state dict}`` of this optimizer in a checkpoint where the model is
        ``name`` (``actor/tp0_pp1``, or ``actor/tp0_pp1_ep1`` under expert parallelism). The
        moments are 1-D DTensors over their buffer's mesh (views: DCP loads into them in place).
        The dense moments, the step count and the learning rate go under ``<name>/optim_dp_sharded``
        with an ``_ep<e>`` suffix dropped, since every ep rank holds a dp range of the same ones;
        the experts' under ``<name>/optim_dp_sharded_experts``, per ep rank."""
        dense, *experts = self.buckets
        out = {f"{re.sub(r'_ep[0-9]+$', '', name)}/{STATE_KEY}": {
            **self._sharded_moments(dense), "step": self._moments(dense)["step"],
            "lr": torch.tensor(float(self.param_groups[0]["lr"]), dtype=torch.float64)}}
        if experts:
            out[f"{name}/{STATE_KEY}_experts"] = self._sharded_moments(experts[0])
        return out

    def load_checkpoint_state(self, name: str, loaded: dict[str, dict]) -> None:
        """Take what DCP loaded into :meth:`checkpoint_state`'s tensors."""
        states = list(loaded.values())  # dense first, as checkpoint_state orders them
        for bucket, state in zip(self.buckets, states):
            moments = self._moments(bucket)
            for key in _MOMENTS:
                local = state[key].to_local() if isinstance(state[key], DTensor) else state[key]
                if local.data_ptr() != moments[key].data_ptr():
                    moments[key][: bucket.owned].copy_(local)
            if states[0]["step"] is not moments["step"]:  # the buffers step together: one count
                moments["step"].copy_(states[0]["step"])
        self.param_groups[0]["lr"] = float(states[0]["lr"])

    def _sharded_moments(self, bucket: FlatBuffer) -> dict:
        state = self._moments(bucket)
        return {key: DTensor.from_local(state[key][: bucket.owned], bucket.mesh, [Shard(0)], run_check=False,
                                        shape=torch.Size([bucket.numel]), stride=(1,)) for key in _MOMENTS}

    def _moments(self, bucket: FlatBuffer) -> dict:
        """AdamW's state of ``bucket``'s owned range, created (zeros, step 0) before the first
        step, in the layout ``torch.optim.AdamW`` would create it."""
        state = self.state[bucket.shard]
        if not state:
            group = self.param_groups[0]
            on_device = group["fused"] or group["capturable"]
            state["step"] = torch.zeros((), dtype=torch.float32, device=bucket.shard.device if on_device else "cpu")
            state["exp_avg"] = torch.zeros_like(bucket.shard, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(bucket.shard, memory_format=torch.preserve_format)
        return state


def expert_parallel_groups(actor, device_type: str) -> dict:
    """``ShardedAdamW``'s expert keyword arguments for a megatron stage: under expert
    parallelism, megatron's expert-data-parallel group as a mesh and the EP x PP norm group;
    nothing otherwise (the experts then share the dp group with the rest)."""
    if not actor.args.is_moe or actor.ep_size == 1:
        return {}
    from megatron.core import parallel_state as ps
    from torch.distributed.device_mesh import DeviceMesh

    mesh = DeviceMesh.from_group(ps.get_expert_data_parallel_group(), device_type, mesh_dim_names=("expert_dp",))
    return dict(expert_dp_mesh=mesh, expert_norm_group=ps.get_expert_tensor_model_pipeline_parallel_group())


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
