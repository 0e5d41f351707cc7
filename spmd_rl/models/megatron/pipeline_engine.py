"""The rollout engine of a pipelined megatron run: the first stage generates for its pipeline.

All stages of one pipeline hold the same data (the same dp share), and stage 0 and the last
stage must agree on every token, or the activations they exchange would not have the shapes
both expect. So only the first stage's ranks hold an engine (tensor-parallel over their tp
group) and generate; the completions reach the other stages by a broadcast over the pipeline
group. The tokens are then identical on every stage whatever a GPU's reduction order, and a
pipeline generates once instead of pp times. Every rank still takes part in the weight stream
(its gathers are collectives); the ranks without an engine drain it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

from spmd_rl.rollout.types import Completion, SamplingParams


class FirstStageEngine:
    """A :class:`~spmd_rl.rollout.engine.RolloutEngine` over a pipeline group: ``engine`` on
    stage 0 (None elsewhere) generates, every stage returns its completions."""

    def __init__(self, engine, pp_group, pp_rank: int):
        if (engine is None) != (pp_rank > 0):
            raise ValueError("the first pipeline stage, and only it, holds the engine")
        self.engine, self.pp_group, self.pp_rank = engine, pp_group, pp_rank
        self.source = dist.get_global_rank(pp_group, 0)
        self.last_stats: dict[str, float] = {}

    @property
    def tp_group(self):
        return getattr(self.engine, "tp_group", None)

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 seeds: list[int] | None = None) -> list[list[Completion]]:
        box = [None, None]
        if self.engine is not None:
            box = [self.engine.generate(prompts, params, seeds), dict(getattr(self.engine, "last_stats", {}))]
        dist.broadcast_object_list(box, src=self.source, group=self.pp_group)
        completions, self.last_stats = box
        return completions

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        if self.engine is not None:
            self.engine.update_weights(named_tensors)
        else:
            for _ in named_tensors:  # each tensor is gathered collectively: take part, keep nothing
                pass

    def sleep(self) -> None:
        if self.engine is not None:
            self.engine.sleep()

    def wake_up(self) -> None:
        if self.engine is not None:
            self.engine.wake_up()
