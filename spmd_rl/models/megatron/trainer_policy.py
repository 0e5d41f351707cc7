"""The megatron-core policy as the PPO loop holds it (``actor.strategy=megatron``).

:class:`MegatronPolicy` is an ``nn.Module`` around this rank's GPTModel stage so that the
checkpointer and the optimizer treat it like the FSDP policy. It is checkpointed under a name of
its place in the model-parallel grid (``actor/tp0_pp1``): each TP x PP shard, with its optimizer
state and param groups, gets keys of its own, while the dp replicas of a shard share them and
DCP writes them once. Resuming therefore needs the same ``parallel.tp`` and ``parallel.pp``.

Ranks are laid out as megatron's default order (tp fastest, then dp, then pp), the same as
the trainer's mesh (``ParallelDims``: pp outermost, tp innermost), so the dp group megatron
sums gradients over is the trainer's ``dp`` group that shares prompts and metrics.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

from spmd_rl.config import OptimConfig
from spmd_rl.errors import UserError
from spmd_rl.models.megatron import policy as megatron_policy
from spmd_rl.models.megatron.backend import MegatronActor, build_actor, load_stage_hf_state
from spmd_rl.models.megatron.distributed_optimizer import ShardedAdamW, expert_parallel_groups
from spmd_rl.trainer.offload import HostOffload


class MegatronPolicy(nn.Module):
    """One rank's pipeline stage of the policy, with the PPO loop's three operations."""

    def __init__(self, actor: MegatronActor, kernels: str = "torch"):
        super().__init__()
        self.actor = actor
        self.kernels = kernels
        self.stage = actor.model
        self.host_offload: HostOffload | None = None  # ref.offload: host memory between logprob passes

    def wait_in_host_memory(self, device: torch.device) -> None:
        """``ref.offload``: keep this frozen stage in host memory, on the device only while
        :meth:`logprobs` runs."""
        self.host_offload = HostOffload([self], device=device, frozen=True)
        self.host_offload.offload()

    @property
    def shard_name(self) -> str:
        return self.actor.shard_name

    @property
    def args(self):
        return self.actor.args

    @torch.no_grad()
    def logprobs(self, batch, temperature: float, micro_batch_size: int, *, max_tokens: int = 0) -> torch.Tensor:
        """``[B, T]`` response logprobs on every rank (old or reference logprobs)."""
        if self.host_offload is None:
            return megatron_policy.compute_logprobs(self.actor, batch, temperature, micro_batch_size,
                                                    max_tokens=max_tokens, kernels=self.kernels)
        self.host_offload.reload()
        try:
            return megatron_policy.compute_logprobs(self.actor, batch, temperature, micro_batch_size,
                                                    max_tokens=max_tokens, kernels=self.kernels)
        finally:
            self.host_offload.offload()

    def update(self, optimizer, scheduler, batch, cfg, **kwargs) -> dict[str, float]:
        """PPO epochs over the batch's mini-batches (see ``spmd_rl.models.megatron.policy.update``)."""
        return megatron_policy.update(self.actor, optimizer, scheduler, batch, cfg, kernels=self.kernels, **kwargs)

    def sharded_optimizer(self, cfg: OptimConfig, dp_mesh) -> ShardedAdamW:
        """AdamW with its state sharded over ``dp_mesh`` (``actor.megatron.use_distributed_optimizer``)."""
        return ShardedAdamW(self, cfg, dp_mesh, tp_rank=self.actor.tp_rank, skip_tied_copy=self.actor.tied_copy,
                            **expert_parallel_groups(self.actor, dp_mesh.device_type))

    def hf_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The whole model as HF-named tensors, one at a time, on every rank (a collective)."""
        return self.actor.iter_hf_weights()


def check_megatron_run(cfg, dims) -> None:
    """One-line UserError for the switches the megatron actor does not combine with."""
    refused = {
        f"parallel.sp={dims.sp} (megatron's context parallelism is not wired)": dims.sp > 1,
        f"rollout.engine={cfg.rollout.engine} (the native engine takes megatron's weights)": cfg.rollout.engine != "native",
        "model.implementation=generic (GPTModel covers the native decoder's families)": cfg.model.implementation == "generic",
        "model.compile=true (it compiles the native decoder's blocks)": cfg.model.compile,
        "model.random_init=true (stages load the HF checkpoint)": cfg.model.random_init,
    }
    for what, bad in refused.items():
        if bad:
            raise UserError(f"actor.strategy=megatron does not support {what}: use actor.strategy=fsdp or change it")


def build_megatron_policy(cfg, path: str, dims, mesh, *, kernels: str, trainable: bool = True,
                          compute_dtype: torch.dtype | None = None) -> MegatronPolicy:
    """This rank's stage of the HF checkpoint at ``path`` over ``parallel.tp`` x ``parallel.pp``;
    frozen unless ``trainable``; bf16 ``compute_dtype``: mixed precision over fp32 parameters."""
    from spmd_rl.models.args import ModelArgs
    from spmd_rl.models.hf_io import read_hf_config

    args = ModelArgs.from_hf_config(read_hf_config(path))
    # fp32 parameters: torch's AdamW updates them in place, so they are the master weights, and
    # the math runs under autocast to compute_dtype, as FSDP's mixed precision casts its gathered
    # parameters (megatron's own bf16 path keeps fp32 copies in its distributed optimizer instead).
    actor = build_actor(args, dims.tp, dims.pp, ep=dims.ep, seed=cfg.trainer.seed, params_dtype=torch.float32,
                        hf_state=load_stage_hf_state(path, args, dims.tp, dims.pp, ep=dims.ep, seed=cfg.trainer.seed),
                        recompute=trainable and cfg.actor.activation_checkpointing,
                        compute_dtype=compute_dtype)
    _check_same_dp_group(mesh)
    policy = MegatronPolicy(actor, kernels)
    if not trainable:
        policy.requires_grad_(False).eval()
    return policy


def _check_same_dp_group(mesh) -> None:
    """megatron's data-parallel group must be the trainer's (same ranks), or prompts, metrics
    and gradient sums would disagree about who holds which data."""
    from megatron.core import parallel_state

    ours = dist.get_process_group_ranks(mesh["dp"].get_group())
    theirs = dist.get_process_group_ranks(parallel_state.get_data_parallel_group())
    if sorted(ours) != sorted(theirs):
        raise RuntimeError(f"megatron's data-parallel group {theirs} differs from the trainer's {ours}")
