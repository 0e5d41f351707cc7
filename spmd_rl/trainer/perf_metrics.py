"""Model FLOPs of an RL step's phases and the MFU they imply (``perf/mfu/<phase>``)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from spmd_rl.config import Config
from spmd_rl.distributed.collectives import all_reduce_sum
from spmd_rl.observability.flops import inference_flops, mfu, training_flops
from spmd_rl.trainer.batch import RolloutBatch


def step_flops(cfg: Config, c, batch: RolloutBatch, *, actor_updated: bool) -> dict[str, float]:
    """FLOPs of this step's phases over all ranks, as ``_flops/<phase>`` (popped by :func:`mfu_metrics`).

    Counted on the trained batch: DAPO's dropped groups and ReMax's greedy baselines are not, and
    ``gen`` counts each sample's prompt again (an upper bound when an engine shares prefixes)."""
    lengths = [len(p) + len(r) for p, r in zip(batch.prompt_ids, batch.response_ids)]
    targets = sum(len(r) for r in batch.response_ids)  # logits only where a response token is predicted
    flops: dict[str, int] = {}
    args = c.policy_args()  # None for GenericCausalLM: nothing to count from
    if args is not None:
        forward = inference_flops(args, lengths, lm_head_tokens=targets)
        flops.update(gen=forward, old_log_prob=forward)
        if c.ref is not None:
            flops["ref"] = forward
        if actor_updated:
            flops["update_actor"] = cfg.actor.ppo_epochs * training_flops(args, lengths, lm_head_tokens=targets)
    critic_args = c.critic_args()
    if critic_args is not None:  # the value head (H -> 1) is negligible
        flops["values"] = inference_flops(critic_args, lengths, lm_head_tokens=0)
        flops["update_critic"] = cfg.critic.ppo_epochs * training_flops(critic_args, lengths, lm_head_tokens=0)
    return {f"_flops/{k}": all_reduce_sum(v, c.dp_group) for k, v in sorted(flops.items())}


def mfu_metrics(metrics: dict[str, float], device: torch.device) -> dict[str, float]:
    """Pop ``_flops/*`` from ``metrics``; return ``perf/mfu/<phase>`` and ``perf/mfu/step`` where
    the device's peak is known (GPU table or ``SPMD_RL_PEAK_TFLOPS``), with the update phases also
    under their short names ``perf/mfu/actor`` and ``perf/mfu/critic``."""
    flops = {k.split("/", 1)[1]: metrics.pop(k) for k in sorted(metrics) if k.startswith("_flops/")}
    flops["step"] = sum(flops.values())
    world = dist.get_world_size() if dist.is_initialized() else 1
    out = {}
    for phase, value in flops.items():
        u = mfu(value, metrics.get(f"timing_s/{phase}", 0.0), device, world)
        if u is not None:
            out[f"perf/mfu/{phase}"] = u
    for short, phase in (("actor", "update_actor"), ("critic", "update_critic")):
        if f"perf/mfu/{phase}" in out:
            out[f"perf/mfu/{short}"] = out[f"perf/mfu/{phase}"]
    return out
