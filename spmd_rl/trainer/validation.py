"""Validation: generate on the val set (sharded over dp), score, report per data_source."""

from __future__ import annotations

from collections import defaultdict

import torch.distributed as dist

from spmd_rl.rollout.types import SamplingParams
from spmd_rl.rollout.weight_sync import sync_weights


def run_validation(cfg, c) -> dict[str, float]:
    """``val-core/<data_source>/acc/mean@N`` (mean score of N samples per prompt) and
    ``val-core/acc`` over all prompts, plus the mean response length."""
    n = cfg.rollout.val_n
    params = SamplingParams(n=n, temperature=cfg.rollout.val_temperature, top_p=cfg.rollout.top_p,
                            top_k=cfg.rollout.top_k, max_new_tokens=cfg.data.max_response_length,
                            stop_token_ids=c.stop_token_ids)
    mine = [c.val_dataset[i] for i in range(c.rank, len(c.val_dataset), dist.get_world_size())]
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])  # score sum, count, length sum
    if mine:
        c.engine.wake_up()
        sync_weights(c.policy.decoder, c.engine)
        completions = c.engine.generate([p.prompt_ids for p in mine], params,
                                        seeds=[c.seed + p.index for p in mine])
        c.engine.sleep()
        flat = [(p, s) for p, samples in zip(mine, completions) for s in samples]
        scores = c.score_texts([p for p, _ in flat], [s.token_ids for _, s in flat])
        for (p, s), score in zip(flat, scores):
            t = totals[p.data_source]
            t[0] += score
            t[1] += 1
            t[2] += len(s.token_ids)
    gathered: list[dict] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, dict(totals))
    merged: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])
    for part in gathered:
        for source, (s, k, length) in part.items():
            merged[source] = [a + b for a, b in zip(merged[source], (s, k, length))]
    metrics = {f"val-core/{src}/acc/mean@{n}": s / k for src, (s, k, _) in merged.items()}
    all_s, all_k, all_len = (sum(v[i] for v in merged.values()) for i in range(3))
    metrics["val-core/acc"] = all_s / max(all_k, 1)
    metrics["val/response_length/mean"] = all_len / max(all_k, 1)
    return metrics
