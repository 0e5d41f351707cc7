"""The value model of PPO: the decoder trunk with a scalar head, its values and its update.

Values are read at the same positions as the policy's logprobs: the hidden state that predicts
response token t gives V(s_t), the value of the state before emitting it (verl's convention).
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from spmd_rl.algorithms.losses import value_loss
from spmd_rl.config import CriticConfig
from spmd_rl.trainer.actor import update_metrics, reshard
from spmd_rl.trainer.batch import RolloutBatch
from spmd_rl.trainer.minibatch import global_counts, micro_batches, mini_batches, scatter_rows
from spmd_rl.trainer.optim import optimizer_step
from spmd_rl.trainer.policy import ScoringInputs, build_scoring_inputs, decoder_hidden, pad_by_lengths


class ValueModel(nn.Module):
    """Decoder trunk + ``Linear(hidden, 1)``; the head starts at zero so the first values are 0
    and the first advantages are plain rewards-to-go rather than noise from a random head."""

    def __init__(self, decoder: nn.Module, hidden_size: int, sp_group=None):
        super().__init__()
        self.decoder = decoder
        self.sp_group = sp_group  # Ulysses sequence-parallel group (None = off)
        self.value_head = nn.Linear(hidden_size, 1, bias=True)
        self.zero_head()

    @torch.no_grad()
    def zero_head(self) -> None:
        """Values of 0 everywhere (also re-run after the trunk is allocated from the meta device)."""
        self.value_head.weight.zero_()
        self.value_head.bias.zero_()

    def forward(self, inputs: ScoringInputs) -> torch.Tensor:
        """``[M]`` fp32 values, one per response token."""
        hidden = decoder_hidden(self.decoder, inputs, self.sp_group)[inputs.target_positions]  # [M, H]
        # sum over the size-1 dim rather than squeeze: FSDP2 warns on (and can mishandle) view outputs
        return self.value_head(hidden).float().sum(-1)


def forward_values(critic: ValueModel, batch: RolloutBatch, device, packed: bool = True) -> torch.Tensor:
    """``[B, T]`` values of the response tokens; ``packed`` as in :func:`~spmd_rl.trainer.actor.forward_logprobs`."""
    inputs = build_scoring_inputs(batch.prompt_ids, batch.response_ids, device, packed=packed)
    return pad_by_lengths(critic(inputs), inputs.response_lengths, batch.response_mask.shape[1])


@torch.no_grad()
def compute_values(critic: ValueModel, batch: RolloutBatch, micro_batch_size: int, device, *,
                   max_tokens: int = 0, packed: bool = True, dp_group=None) -> torch.Tensor:
    """``[B, T]`` values of the batch before the critic update, in micro-batches of
    ``micro_batch_size`` rows or of at most ``max_tokens`` tokens (> 0); rows in batch order."""
    split = micro_batches(batch, micro_batch_size, max_tokens, dp_group, padded=not packed)
    chunks = [forward_values(critic, micro, device, packed=packed) for _, micro in split]
    reshard(critic)
    return scatter_rows(chunks, [rows for rows, _ in split], len(batch), batch.response_mask.shape[1])


def update_critic(critic: ValueModel, optimizer, scheduler, batch: RolloutBatch, cfg: CriticConfig, *,
                  mini_batch_size: int, micro_batch_size: int, scale_factor: int, dp_group, dp_size: int,
                  device, packed: bool = True) -> dict[str, float]:
    """Clipped value regression toward ``batch.returns``; metrics averaged over optimizer steps.

    Micro-batches hold ``micro_batch_size`` rows, or at most ``cfg.max_tokens_per_micro_batch``
    tokens when that is > 0; the loss is normalised by global counts either way."""
    sums: dict[str, float] = defaultdict(float)
    norms, lrs = [], []
    for mini in mini_batches(batch, mini_batch_size, cfg.ppo_epochs):
        tokens, seqs = global_counts(mini, dp_group)
        split = micro_batches(mini, micro_batch_size, cfg.max_tokens_per_micro_batch, dp_group, padded=not packed)
        num_micro = len(split)
        for _, micro in split:
            mask = micro.response_mask.to(device)
            vpreds = forward_values(critic, micro, device, packed=packed)
            loss, m = value_loss(vpreds, micro.values.to(device), micro.returns.to(device), mask,
                                 clip=cfg.cliprange_value, agg_mode=cfg.loss_agg_mode, global_tokens=tokens,
                                 global_seqs=seqs, scale_factor=scale_factor)
            (loss * dp_size).backward()  # FSDP averages gradients over dp; the global normaliser already did
            sums["critic/vf_loss"] += loss.item() * dp_size
            sums["critic/vf_clipfrac"] += float(m["vf_clipfrac"]) / num_micro
            sums["critic/vpred_mean"] += float(m["vpred_mean"]) / num_micro
        lrs.append(scheduler.get_last_lr()[0])  # the rate this optimizer step uses
        norms.append(optimizer_step(critic, optimizer, scheduler, cfg.optim.grad_clip))
    return update_metrics(sums, norms, lrs, "critic")
