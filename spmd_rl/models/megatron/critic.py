"""PPO's value model as megatron-core GPTModel stages (``critic.enable`` with ``actor.strategy=megatron``).

Mirrors ``spmd_rl.trainer.critic``: the trunk is the GPTModel without its lm-head, the last
stage puts a zero-initialised ``Linear(hidden, 1)`` on the final-norm output, values are read
where the policy reads logprobs, and the update is the same clipped value loss with the same
global normalisation and micro-batches. Stages run through the actor's 1F1B schedule and its
gradient rules (:mod:`.grads`): summed over dp, clipped by the TP x PP global norm. The head is
replicated over TP (every TP rank sees the same final hidden states), so it enters the norm once.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace

import torch
from torch import nn

from spmd_rl.algorithms.losses import value_loss
from spmd_rl.config import CriticConfig, OptimConfig
from spmd_rl.models.megatron import grads
from spmd_rl.models.megatron.backend import MegatronActor, build_actor, load_stage_hf_state
from spmd_rl.models.megatron.distributed_optimizer import ShardedAdamW, expert_parallel_groups
from spmd_rl.models.megatron.policy import (
    ParallelGroups,
    activation_shapes,
    broadcast_from_last_stage,
    broadcast_object_from_last_stage,
    forward_steps,
    links_of,
    padded_scoring_inputs,
)
from spmd_rl.models.megatron.schedule import run_pipeline
from spmd_rl.trainer.actor import update_metrics
from spmd_rl.trainer.batch import RolloutBatch
from spmd_rl.trainer.minibatch import global_counts, micro_batches, mini_batches, scatter_rows
from spmd_rl.trainer.policy import ScoringInputs, pad_by_lengths


class MegatronValueModel(nn.Module):
    """One rank's pipeline stage of the value model; the last stage holds the value head."""

    def __init__(self, trunk: MegatronActor):
        super().__init__()
        if trunk.has_output_layer:
            raise ValueError("a value model's trunk is built without its output layer (build_actor(output_layer=False))")
        self.trunk = trunk
        self.stage = trunk.model
        self.value_head = None
        if trunk.pp_rank == trunk.pp_size - 1:
            param = next(self.stage.parameters())
            # zero: the first values are 0, as the FSDP value model's (trainer/critic.py)
            self.value_head = nn.Linear(trunk.args.hidden_size, 1, bias=True, dtype=param.dtype, device=param.device)
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)

    @property
    def shard_name(self) -> str:
        return self.trunk.shard_name

    def sharded_optimizer(self, cfg: OptimConfig, dp_mesh) -> ShardedAdamW:
        """AdamW with its state sharded over ``dp_mesh`` (``critic.megatron.use_distributed_optimizer``)."""
        return ShardedAdamW(self, cfg, dp_mesh, tp_rank=self.trunk.tp_rank, skip_tied_copy=False,
                            **expert_parallel_groups(self.trunk, dp_mesh.device_type))

    def stage_values(self, hidden: torch.Tensor, inputs: ScoringInputs) -> torch.Tensor:
        """``[M]`` fp32 values of the response tokens from the last stage's output ``[T, S, H]``."""
        flat = hidden.transpose(0, 1).reshape(-1, hidden.shape[-1])  # [S*T, H], row s at s*T
        with self.trunk.compute():
            return self.value_head(flat[inputs.target_positions]).float().sum(-1)

    def _run(self, split, groups: ParallelGroups, forward_only: bool, loss_step) -> list:
        inputs = padded_scoring_inputs(split, next(self.stage.parameters()).device, groups)
        return run_pipeline(len(split), activation_shapes(inputs, self.trunk.args.hidden_size),
                            forward_steps(self.trunk, inputs), lambda i, hidden: loss_step(i, hidden, inputs[i]),
                            links_of(self.trunk), forward_only=forward_only)

    @torch.no_grad()
    def values(self, batch: RolloutBatch, micro_batch_size: int, *, max_tokens: int = 0) -> torch.Tensor:
        """``[B, T]`` values of the batch's response tokens on every rank (before the update)."""
        groups = ParallelGroups.from_megatron(self.trunk)
        split = micro_batches(batch, micro_batch_size, max_tokens, groups.dp, padded=True)

        def loss_step(i: int, hidden: torch.Tensor, inputs: ScoringInputs):
            width = split[i][1].response_mask.shape[1]
            return None, pad_by_lengths(self.stage_values(hidden, inputs), inputs.response_lengths, width)

        chunks = self._run(split, groups, True, loss_step)
        width = batch.response_mask.shape[1]
        out = (scatter_rows(chunks, [rows for rows, _ in split], len(batch), width).float() if chunks
               else torch.zeros(len(batch), width))
        return broadcast_from_last_stage(self.trunk, out.to(next(self.stage.parameters()).device)).cpu()

    def update(self, optimizer, scheduler, batch: RolloutBatch, cfg: CriticConfig, *, mini_batch_size: int,
               micro_batch_size: int, scale_factor: int) -> dict[str, float]:
        """Clipped value regression toward ``batch.returns`` as ``spmd_rl.trainer.critic.update_critic``;
        metrics per dp rank (the caller averages over dp), the same on every rank of a pipeline."""
        trunk = self.trunk
        groups = replace(ParallelGroups.from_megatron(trunk), embedding=None)  # no lm-head: nothing tied
        device = next(self.stage.parameters()).device
        sums: dict[str, float] = defaultdict(float)
        norms, lrs = [], []
        grads.begin_update(optimizer)
        for mini in mini_batches(batch, mini_batch_size, cfg.ppo_epochs):
            tokens, seqs = global_counts(mini, groups.dp)
            split = micro_batches(mini, micro_batch_size, cfg.max_tokens_per_micro_batch, groups.dp, padded=True)

            def loss_step(i: int, hidden: torch.Tensor, inputs: ScoringInputs):
                micro = split[i][1]
                mask = micro.response_mask.to(device)
                vpreds = pad_by_lengths(self.stage_values(hidden, inputs), inputs.response_lengths, mask.shape[1])
                loss, m = value_loss(vpreds, micro.values.to(device), micro.returns.to(device), mask,
                                     clip=cfg.cliprange_value, agg_mode=cfg.loss_agg_mode, global_tokens=tokens,
                                     global_seqs=seqs, scale_factor=scale_factor)
                # gradients are summed over dp (grads.optimizer_step): the loss is this rank's share
                sums["critic/vf_loss"] += loss.item() * groups.dp_size
                sums["critic/vf_clipfrac"] += float(m["vf_clipfrac"]) / len(split)
                sums["critic/vpred_mean"] += float(m["vpred_mean"]) / len(split)
                return loss, None

            self._run(split, groups, False, loss_step)
            lrs.append(scheduler.get_last_lr()[0])  # the rate this optimizer step uses
            norms.append(grads.optimizer_step(self, optimizer, scheduler, cfg.optim.grad_clip, groups=groups,
                                              tp_rank=trunk.tp_rank, skip_tied_copy=False))
        grads.end_update(optimizer)
        sums = broadcast_object_from_last_stage(trunk, dict(sums))
        return update_metrics(sums, norms, lrs, "critic")


def build_megatron_critic(cfg, path: str, dims, *, compute_dtype: torch.dtype | None = None) -> MegatronValueModel:
    """This rank's stage of the value model initialised from the HF checkpoint at ``path`` over
    ``parallel.tp`` x ``parallel.pp`` (fp32 parameters, as the megatron policy's), with
    per-layer recompute when ``critic.activation_checkpointing`` and mixed precision with ``compute_dtype``."""
    from spmd_rl.models.args import ModelArgs
    from spmd_rl.models.hf_io import read_hf_config

    args = ModelArgs.from_hf_config(read_hf_config(path))
    role = f"the critic ({path}) under actor.strategy=megatron"
    trunk = build_actor(args, dims.tp, dims.pp, ep=dims.ep, seed=cfg.trainer.seed, params_dtype=torch.float32,
                        hf_state=load_stage_hf_state(path, args, dims.tp, dims.pp, ep=dims.ep, seed=cfg.trainer.seed,
                                                     role=role),
                        output_layer=False, recompute=cfg.critic.activation_checkpointing,
                        compute_dtype=compute_dtype, role=role)
    return MegatronValueModel(trunk)
