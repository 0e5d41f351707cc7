"""Policy logprobs and the PPO update over mini- and micro-batches.

Loss normalisation is global: each micro-batch's loss is divided by the token (or sequence) count
of the whole mini-batch over all dp ranks, and multiplied by the dp size because FSDP averages
gradients over ranks. The summed gradient is then exactly the single-process one, whatever the
micro-batch size or the number of ranks, and whether micro-batches hold a fixed number of
sequences or a token budget (``actor.max_tokens_per_micro_batch``: they are then formed by
length, not row order, and results are put back in row order).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import asdict

import torch
from torch.distributed.fsdp import FSDPModule

from spmd_rl.algorithms.kl import kl_penalty
from spmd_rl.algorithms.losses import aggregate_loss, get_policy_loss
from spmd_rl.config import ActorConfig
from spmd_rl.trainer.batch import RolloutBatch
from spmd_rl.trainer.minibatch import global_counts, micro_batches, mini_batches, scatter_rows
from spmd_rl.trainer.optim import optimizer_step
from spmd_rl.trainer.policy import PolicyModel, build_scoring_inputs, pad_by_lengths


def forward_logprobs(policy: PolicyModel, batch: RolloutBatch, temperature: float, device,
                     with_entropy: bool = False, packed: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logprobs (and entropy) of the batch's response tokens, padded to ``[B, T]``; ``packed``
    chooses padding-free rows or right-padded ones (``actor.use_remove_padding``)."""
    inputs = build_scoring_inputs(batch.prompt_ids, batch.response_ids, device, packed=packed)
    logprobs, entropy = policy(inputs, temperature=temperature, with_entropy=with_entropy)
    width = batch.response_mask.shape[1]
    logprobs = pad_by_lengths(logprobs, inputs.response_lengths, width)
    if entropy is not None:
        entropy = pad_by_lengths(entropy, inputs.response_lengths, width)
    return logprobs, entropy


@torch.no_grad()
def compute_logprobs(policy: PolicyModel, batch: RolloutBatch, temperature: float, micro_batch_size: int,
                     device, *, max_tokens: int = 0, packed: bool = True, dp_group=None) -> torch.Tensor:
    """``[B, T]`` logprobs of ``policy`` (the PPO "old" or the reference logprobs), in micro-batches
    of ``micro_batch_size`` rows, or of at most ``max_tokens`` tokens when it is > 0 (every rank of
    ``dp_group`` then runs the same number of them); rows come back in the batch's order."""
    split = micro_batches(batch, micro_batch_size, max_tokens, dp_group, padded=not packed)
    chunks = [forward_logprobs(policy, micro, temperature, device, packed=packed)[0] for _, micro in split]
    reshard(policy)
    return scatter_rows(chunks, [rows for rows, _ in split], len(batch), batch.response_mask.shape[1])


def reshard(model: torch.nn.Module) -> None:
    """Free the gathered parameters of every FSDP2 unit after a forward without backward: the
    root and the last block keep theirs gathered for the backward that normally follows, and a
    frozen model (the reference, or the policy during critic warmup) would otherwise hold them."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def update_policy(policy: PolicyModel, optimizer, scheduler, batch: RolloutBatch, cfg: ActorConfig, *,
                  temperature: float, mini_batch_size: int, scale_factor: int, dp_group, dp_size: int, device,
                  generator: torch.Generator | None = None) -> dict[str, float]:
    """PPO epochs over mini-batches of ``mini_batch_size`` responses (this rank's share).

    ``scale_factor`` is the constant of ``seq-mean-token-sum-norm`` (data.max_response_length),
    fixed so that it does not depend on how long the responses of one micro-batch happen to be.
    Returns metrics averaged over optimizer steps (still per rank; the caller reduces over dp)."""
    loss_fn = get_policy_loss(cfg.policy_loss)
    sums: dict[str, float] = defaultdict(float)
    norms, lrs = [], []
    for mini in mini_batches(batch, mini_batch_size, cfg.ppo_epochs):
        step_metrics = _mini_batch_step(policy, loss_fn, mini, cfg, temperature, scale_factor, dp_group, dp_size,
                                        device, generator)
        lrs.append(scheduler.get_last_lr()[0])  # the rate this optimizer step uses
        norms.append(optimizer_step(policy, optimizer, scheduler, cfg.optim.grad_clip))
        for k, v in step_metrics.items():
            sums[k] += v
    return update_metrics(sums, norms, lrs, "actor")


def update_metrics(sums: dict[str, float], norms: list[float], lrs: list[float], prefix: str) -> dict[str, float]:
    """An update's metrics from its optimizer steps: each summed metric over the step count, the
    mean of the finite gradient norms, how many steps were skipped as non-finite, and the mean
    learning rate the steps used (verl logs the step's rate; this is it for one step per update)."""
    metrics = {k: v / len(norms) for k, v in sums.items()}
    finite = [n for n in norms if math.isfinite(n)]
    metrics[f"{prefix}/grad_norm"] = sum(finite) / len(finite) if finite else float("nan")
    metrics[f"{prefix}/nonfinite_skips"] = float(len(norms) - len(finite))
    metrics[f"{prefix}/lr"] = sum(lrs) / len(lrs)
    return metrics


def _mini_batch_step(policy, loss_fn, mini: RolloutBatch, cfg: ActorConfig, temperature, scale_factor, dp_group,
                     dp_size, device, generator) -> dict[str, float]:
    """Accumulate the gradients of one mini-batch; return its (rank-local) metrics.

    Loss-valued metrics are summed over micro-batches and multiplied by dp_size: the caller's mean
    over ranks then gives the loss of the whole global mini-batch."""
    tokens, seqs = global_counts(mini, dp_group)
    agg = dict(global_tokens=tokens, global_seqs=seqs, scale_factor=scale_factor)
    metrics: dict[str, float] = defaultdict(float)
    split = micro_batches(mini, cfg.micro_batch_size_per_device, cfg.max_tokens_per_micro_batch, dp_group,
                          padded=not cfg.use_remove_padding)
    for _, micro in split:
        logprobs, entropy = forward_logprobs(policy, micro, temperature, device, with_entropy=True,
                                             packed=cfg.use_remove_padding)
        loss, micro_metrics = micro_batch_loss(logprobs, entropy, micro, cfg, loss_fn, agg, generator,
                                               dp_size=dp_size, num_micro=len(split), device=device)
        (loss * dp_size).backward()  # FSDP averages over dp; the global normaliser already did
        for key, value in micro_metrics.items():
            metrics[key] += value
    if cfg.use_kl_loss:
        metrics["actor/kl_coef"] = cfg.kl_loss_coef
    return dict(metrics)


def micro_batch_loss(logprobs: torch.Tensor, entropy: torch.Tensor, micro: RolloutBatch, cfg: ActorConfig, loss_fn,
                     agg: dict, generator, *, dp_size: int, num_micro: int,
                     device) -> tuple[torch.Tensor, dict[str, float]]:
    """One micro-batch's loss (policy loss - entropy bonus + KL loss, normalised by the global
    mini-batch counts in ``agg``) and its metric contributions, for any policy backend.

    The loss is this rank's share of the global one; a backend whose gradients are averaged over
    dp (FSDP) multiplies it by ``dp_size``. Loss-valued metrics are multiplied by ``dp_size`` so
    that the caller's mean over dp ranks is the loss of the whole global mini-batch."""
    mask = micro.response_mask.to(device)
    pg_loss, loss_metrics = loss_fn(
        logprobs, micro.old_logprobs.to(device), micro.advantages.to(device), mask,
        clip_low=cfg.clip_ratio_low, clip_high=cfg.clip_ratio_high, clip_c=cfg.clip_ratio_c,
        agg_mode=cfg.loss_agg_mode, generator=generator, **agg, **asdict(cfg.policy_loss_options))
    loss = pg_loss
    metrics = {"actor/pg_loss": pg_loss.item() * dp_size}
    if cfg.entropy_coeff != 0:
        loss = loss - cfg.entropy_coeff * aggregate_loss(entropy, mask, cfg.loss_agg_mode, **agg)
    if cfg.use_kl_loss:
        kl_loss = aggregate_loss(kl_penalty(logprobs, micro.ref_logprobs.to(device), cfg.kl_loss_type), mask,
                                 cfg.loss_agg_mode, **agg)
        loss = loss + cfg.kl_loss_coef * kl_loss
        metrics["actor/kl_loss"] = kl_loss.item() * dp_size
    # token-mean over the global mini-batch whatever loss_agg_mode is: comparable across runs
    metrics["actor/entropy"] = aggregate_loss(entropy.detach(), mask, "token-mean",
                                              global_tokens=agg["global_tokens"]).item() * dp_size
    for name, value in loss_metrics.items():
        metrics[f"actor/{name}"] = float(value) / num_micro
    return loss, metrics
