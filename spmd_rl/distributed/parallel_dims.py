"""Parallel degrees validated against the world size, and the named DeviceMesh built from them."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from spmd_rl.errors import UserError

# torch warns that slicing a flattened dim ("dp", "dp_shard_sp") from the root mesh may go away;
# it is the documented way in this torch version, and the warning would repeat on every rank.
warnings.filterwarnings("ignore", message="Slicing a flattened dim from root mesh")


@dataclass
class ParallelDims:
    """Degrees of each parallel dimension; ``dp_shard=-1`` takes what the others leave.

    Mesh layout, outermost first: ``[pp x] dp_replicate x dp_shard x sp x tp`` (tp innermost, so a
    tp group sits on neighbouring ranks, i.e. inside one node; pp, only with the Megatron backend,
    outermost as in megatron's own rank order). Ranks that differ only in ``sp`` or
    ``tp`` hold the same data; ``dp = dp_replicate x dp_shard`` ranks hold different data.
    FSDP shards parameters over ``dp_shard x sp`` and replicates over ``dp_replicate`` (HSDP).
    ``ep`` (Megatron backend, mixture-of-experts models) adds no mesh dimension: it splits the
    experts over ``ep`` ranks of each data-parallel group, so it must divide ``dp``."""

    dp_replicate: int
    dp_shard: int
    sp: int
    tp: int
    pp: int
    world_size: int
    ep: int = 1

    def __post_init__(self):
        others = self.dp_replicate * self.sp * self.tp * self.pp
        if self.dp_shard == -1 and others > 0 and self.world_size % others == 0:
            self.dp_shard = self.world_size // others
        degrees = (self.dp_replicate, self.dp_shard, self.sp, self.tp, self.pp)
        if min(degrees) < 1 or self.dp_replicate * self.dp_shard * self.sp * self.tp * self.pp != self.world_size:
            raise UserError(
                f"Invalid parallel dims: dp_replicate({self.dp_replicate}) * dp_shard({self.dp_shard}) * "
                f"sp({self.sp}) * tp({self.tp}) * pp({self.pp}) != WORLD_SIZE({self.world_size}): "
                "change parallel.* or the number of processes (torchrun --nproc-per-node)"
            )
        if self.ep < 1 or self.dp_size % self.ep:
            raise UserError(
                f"Invalid parallel dims: ep({self.ep}) must divide dp = dp_replicate({self.dp_replicate}) * "
                f"dp_shard({self.dp_shard}) = {self.dp_size} (sp={self.sp}, tp={self.tp}, pp={self.pp}, "
                f"WORLD_SIZE={self.world_size}): experts are split over data-parallel ranks; change parallel.ep"
            )

    @property
    def dp_size(self) -> int:
        """Ranks that hold different data (replicas x shards)."""
        return self.dp_replicate * self.dp_shard

    @property
    def fsdp_enabled(self) -> bool:
        return self.dp_shard * self.sp > 1

    def build_mesh(self, device_type: str) -> DeviceMesh:
        """The named mesh: ``[pp,] dp_replicate, dp_shard, sp, tp`` plus the flattened ``dp``
        (``dp_replicate x dp_shard``: data) and ``dp_shard_sp`` (``dp_shard x sp``: FSDP shards)."""
        names = ("dp_replicate", "dp_shard", "sp", "tp")
        shape = (self.dp_replicate, self.dp_shard, self.sp, self.tp)
        if self.pp > 1:
            names, shape = ("pp", *names), (self.pp, *shape)
        mesh = init_device_mesh(device_type, shape, mesh_dim_names=names)
        mesh["dp_replicate", "dp_shard"]._flatten("dp")
        mesh["dp_shard", "sp"]._flatten("dp_shard_sp")
        return mesh

    def fsdp_mesh(self, mesh: DeviceMesh) -> DeviceMesh:
        """Where FSDP2 lives: 1-D ``dp_shard_sp``, or 2-D ``(dp_replicate, dp_shard_sp)`` for HSDP."""
        if self.dp_replicate > 1:
            return mesh["dp_replicate", "dp_shard_sp"]
        return mesh["dp_shard_sp"]
