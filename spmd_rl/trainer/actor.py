"""Policy logprobs and the PPO update over mini- and micro-batches.

Loss normalisation is global: each micro-batch's loss is divided by the token (or sequence) count
of the whole mini-batch over all dp ranks, and multiplied by the dp size because FSDP averages
gradients over ranks. The summed gradient is then exactly the single-process one.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from spmd_rl.algorithms.losses import get_policy_loss
from spmd_rl.config import ActorConfig
from spmd_rl.distributed.collectives import all_reduce_sum
from spmd_rl.trainer.batch import RolloutBatch
from spmd_rl.trainer.optim import optimizer_step
from spmd_rl.trainer.policy import PolicyModel, build_scoring_inputs, pad_by_lengths


def forward_logprobs(policy: PolicyModel, batch: RolloutBatch, temperature: float, device,
                     with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logprobs (and entropy) of the batch's response tokens, padded to ``[B, T]``."""
    inputs = build_scoring_inputs(batch.prompt_ids, batch.response_ids, device)
    logprobs, entropy = policy(inputs, temperature=temperature, with_entropy=with_entropy)
    width = batch.response_mask.shape[1]
    logprobs = pad_by_lengths(logprobs, inputs.response_lengths, width)
    if entropy is not None:
        entropy = pad_by_lengths(entropy, inputs.response_lengths, width)
    return logprobs, entropy


@torch.no_grad()
def compute_logprobs(policy: PolicyModel, batch: RolloutBatch, temperature: float, micro_batch_size: int,
                     device) -> torch.Tensor:
    """``[B, T]`` logprobs of the current policy (the PPO "old" logprobs), in micro-batches."""
    chunks = []
    for start in range(0, len(batch), micro_batch_size):
        micro = batch.select(range(start, min(start + micro_batch_size, len(batch))))
        lp, _ = forward_logprobs(policy, micro, temperature, device)
        chunks.append(torch.nn.functional.pad(lp.cpu(), (0, batch.response_mask.shape[1] - lp.shape[1])))
    return torch.cat(chunks)


def update_policy(policy: PolicyModel, optimizer, scheduler, batch: RolloutBatch, cfg: ActorConfig, *,
                  temperature: float, mini_batch_size: int, dp_group, dp_size: int, device) -> dict[str, float]:
    """PPO epochs over mini-batches of ``mini_batch_size`` responses (this rank's share).

    Returns metrics averaged over optimizer steps (still per rank; the caller reduces over dp)."""
    loss_fn = get_policy_loss(cfg.policy_loss)
    sums: dict[str, float] = defaultdict(float)
    num_steps = 0
    for _ in range(cfg.ppo_epochs):
        for start in range(0, len(batch), mini_batch_size):
            mini = batch.select(range(start, min(start + mini_batch_size, len(batch))))
            step_metrics = _mini_batch_step(policy, loss_fn, mini, cfg, temperature, dp_group, dp_size, device)
            step_metrics["actor/grad_norm"] = optimizer_step(policy, optimizer, scheduler, cfg.optim.grad_clip)
            for k, v in step_metrics.items():
                sums[k] += v
            num_steps += 1
    metrics = {k: v / num_steps for k, v in sums.items()}
    metrics["actor/lr"] = scheduler.get_last_lr()[0]
    return metrics


def _mini_batch_step(policy, loss_fn, mini: RolloutBatch, cfg: ActorConfig, temperature, dp_group, dp_size,
                     device) -> dict[str, float]:
    """Accumulate gradients of one mini-batch; return its (rank-local) metrics."""
    global_tokens = all_reduce_sum(mini.response_mask.sum().item(), dp_group)
    global_seqs = all_reduce_sum(int((mini.response_mask.sum(-1) > 0).sum()), dp_group)  # as aggregate_loss counts
    metrics: dict[str, float] = defaultdict(float)
    micro_size = cfg.ppo_micro_batch_size_per_gpu
    num_micro = (len(mini) + micro_size - 1) // micro_size
    for start in range(0, len(mini), micro_size):
        micro = mini.select(range(start, min(start + micro_size, len(mini))))
        mask = micro.response_mask.to(device)
        logprobs, entropy = forward_logprobs(policy, micro, temperature, device, with_entropy=True)
        loss, loss_metrics = loss_fn(
            logprobs, micro.old_logprobs.to(device), micro.advantages.to(device), mask,
            clip_low=cfg.clip_ratio_low, clip_high=cfg.clip_ratio_high, clip_c=cfg.clip_ratio_c,
            agg_mode=cfg.loss_agg_mode, global_tokens=global_tokens, global_seqs=global_seqs,
        )
        (loss * dp_size).backward()  # FSDP averages over dp; the global normaliser already did
        # pg_loss is the global mini-batch loss once the caller averages dp_size x local sums.
        metrics["actor/pg_loss"] += loss.item() * dp_size
        metrics["actor/entropy"] += ((entropy.detach() * mask).sum() / mask.sum().clamp(min=1)).item() / num_micro
        for name, value in loss_metrics.items():
            metrics[f"actor/{name}"] += float(value) / num_micro
    return dict(metrics)
