"""Parallel degrees validated against the world size, and the named DeviceMesh built from them."""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from spmd_rl.errors import UserError

# Dimensions a later version composes with FSDP; accepted in the config, refused when > 1 for now.
_NOT_YET = ("sp", "tp", "pp")


@dataclass
class ParallelDims:
    """Degrees of each parallel dimension; ``dp_shard=-1`` takes what the others leave."""

    dp_replicate: int
    dp_shard: int
    sp: int
    tp: int
    pp: int
    world_size: int

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
        for name in _NOT_YET:
            if getattr(self, name) > 1:
                raise UserError(f"parallel.{name}={getattr(self, name)} is not supported in this version: set parallel.{name}=1")

    @property
    def dp_size(self) -> int:
        """Ranks that hold different data (replicas x shards)."""
        return self.dp_replicate * self.dp_shard

    @property
    def fsdp_enabled(self) -> bool:
        return self.dp_shard > 1

    def build_mesh(self, device_type: str) -> DeviceMesh:
        """A 1-D mesh named ``dp`` over all data-parallel ranks (world size 1 included).

        HSDP (``dp_replicate`` x ``dp_shard``) and the sp/tp/pp dimensions become further
        named dimensions of this mesh when they are supported."""
        if self.dp_replicate > 1:
            mesh = init_device_mesh(device_type, (self.dp_replicate, self.dp_shard), mesh_dim_names=("dp_replicate", "dp_shard"))
            return mesh._flatten("dp")
        return init_device_mesh(device_type, (self.dp_size,), mesh_dim_names=("dp",))
