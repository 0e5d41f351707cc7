"""Validation: generate on the val set (sharded over ranks by prompt), score, and report
``mean@N``, ``maj@N`` and ``best@N`` per data_source (:mod:`spmd_rl.trainer.eval_metrics`).

Two halves are shared by the trainer's in-loop validation and ``python -m spmd_rl.evaluate``:
:func:`generate_and_score` (this rank's prompts, no collective) and :func:`summarize` (merge
over ranks, metrics, and the per-response records on rank 0 when asked). The trainer adds the
weight sync around them (:func:`validate`); the evaluation entry point has no trainer weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from spmd_rl.data.rl_dataset import PromptSample
from spmd_rl.rewards.answers import extract_answer
from spmd_rl.rewards.scorer import RewardScorer
from spmd_rl.rollout.engine import RolloutEngine
from spmd_rl.rollout.types import SamplingParams
from spmd_rl.trainer.eval_metrics import PromptGroup, accumulate, merge_totals, validation_metrics


@dataclass
class ResponseRecord:
    """One scored validation response (a row of ``eval/generations.jsonl``)."""

    index: int  # the prompt's row in the (filtered) val dataset
    data_source: str
    prompt: str  # the chat-templated prompt, decoded without special tokens
    response: str  # decoded without special tokens: the text the reward function saw
    score: float
    answer: str | None  # extracted answer (spmd_rl.rewards.answers), None when there is none
    response_length: int  # generated tokens, the stop token included


def validation_sampling(cfg, stop_token_ids: list[int]) -> SamplingParams:
    """``rollout.val_n`` samples per prompt at ``rollout.val_temperature``, up to
    ``data.max_response_length`` tokens."""
    r = cfg.rollout
    return SamplingParams(n=r.val_n, temperature=r.val_temperature, max_new_tokens=cfg.data.max_response_length,
                          stop_token_ids=stop_token_ids, **shared_sampling_options(r))


def shared_sampling_options(rollout_cfg) -> dict:
    """The sampling options training and validation share (truncation, penalties, stop strings)."""
    r = rollout_cfg
    return dict(top_p=r.top_p, top_k=r.top_k, min_p=r.min_p, repetition_penalty=r.repetition_penalty,
                presence_penalty=r.presence_penalty, frequency_penalty=r.frequency_penalty, stop=list(r.stop))


def shard_prompts(dataset, rank: int, world_size: int) -> list[PromptSample]:
    """Rank ``rank``'s whole prompts: every ``world_size``-th row from ``rank`` on."""
    return [dataset[i] for i in range(rank, len(dataset), world_size)]


def generate_and_score(engine: RolloutEngine, tokenizer: Any, scorer: RewardScorer, prompts: list[PromptSample],
                       params: SamplingParams, seed: int) -> list[ResponseRecord]:
    """Sample ``params.n`` responses per prompt on this rank and score them (no collective).

    Prompt ``p`` is sampled with seed ``seed + p.index``, so its responses depend on neither
    the number of ranks nor the other prompts. Records come prompt by prompt, samples in order.
    """
    if not prompts:
        return []
    completions = engine.generate([p.prompt_ids for p in prompts], params, seeds=[seed + p.index for p in prompts])
    flat = [(p, s) for p, samples in zip(prompts, completions) for s in samples]
    texts = tokenizer.batch_decode([s.token_ids for _, s in flat], skip_special_tokens=True)
    scores = scorer.score([p.data_source for p, _ in flat], texts, [p.ground_truth for p, _ in flat],
                          [p.extra_info for p, _ in flat]).scores
    prompt_texts = dict(zip((p.index for p in prompts),
                            tokenizer.batch_decode([p.prompt_ids for p in prompts], skip_special_tokens=True)))
    return [ResponseRecord(index=p.index, data_source=p.data_source, prompt=prompt_texts[p.index], response=text,
                           score=float(score), answer=extract_answer(p.data_source, text),
                           response_length=len(s.token_ids))
            for (p, s), text, score in zip(flat, texts, scores)]


def group_by_prompt(records: list[ResponseRecord]) -> list[PromptGroup]:
    """The records of each prompt together, prompts in order of first appearance."""
    groups: dict[int, list[ResponseRecord]] = {}
    for r in records:
        groups.setdefault(r.index, []).append(r)
    return [PromptGroup(data_source=rs[0].data_source, scores=[r.score for r in rs], answers=[r.answer for r in rs],
                        lengths=[r.response_length for r in rs])
            for rs in groups.values()]


def summarize(records: list[ResponseRecord], n: int, *, keep_records: bool = False,
              group=None) -> tuple[dict[str, float], list[ResponseRecord] | None]:
    """Metrics over the records of every rank (a collective: all ranks call it).

    Each rank reduces its own whole prompts to partial sums and only those travel. With
    ``keep_records`` rank 0 also receives every rank's records, sorted by prompt index (samples
    of a prompt in order); other ranks, and every rank without it, get None.
    """
    world_size = dist.get_world_size(group)
    parts: list = [None] * world_size
    dist.all_gather_object(parts, accumulate(group_by_prompt(records)), group=group)
    metrics = validation_metrics(merge_totals(parts), n)
    if not keep_records:
        return metrics, None
    if group is not None:
        raise ValueError("keep_records gathers to global rank 0: call summarize without a group")
    is_root = dist.get_rank() == 0
    gathered: list | None = [None] * world_size if is_root else None
    dist.gather_object(records, gathered, dst=0)
    if not is_root:
        return metrics, None
    # sorted() is stable: the samples of one prompt keep their order
    return metrics, sorted((r for part in gathered for r in part), key=lambda r: r.index)


def validate(cfg, c, *, keep_records: bool = False) -> tuple[dict[str, float], list[ResponseRecord] | None]:
    """In-loop validation of the trainer's policy: push its weights into the engine, generate and
    score this rank's share of ``c.val_dataset``, then :func:`summarize`."""
    # Shards by data-parallel rank: the tp/sp ranks of one dp rank generate the same prompts
    # (a tensor-parallel engine needs that) and count once.
    mine = shard_prompts(c.val_dataset, c.dp_rank, c.dp_size)
    c.engine.wake_up()
    # Gathering sharded weights is a collective: a rank with no prompt (fewer prompts than
    # ranks) still takes part.
    c.sync_engine()
    records = generate_and_score(c.engine, c.tokenizer, c.scorer, mine, validation_sampling(cfg, c.stop_token_ids),
                                 c.seed)
    c.engine.sleep()
    group = None if keep_records else c.dp_group
    return summarize(records, cfg.rollout.val_n, keep_records=keep_records, group=group)


def run_validation(cfg, c) -> dict[str, float]:
    """``val-core/<data_source>/acc/{mean,maj,best}@N``, ``val-core/acc`` (overall mean@N),
    ``val/acc/{maj,best}@N`` and ``val/response_length/mean``, the same on every rank."""
    return validate(cfg, c)[0]
