"""``FirstStageEngine`` on 2 gloo ranks (a 2-stage pipeline): only the first stage generates, both
return its completions, and the other stage drains the weight stream without keeping it."""

import pytest
import torch
import torch.distributed as dist

from spmd_rl.models.megatron.pipeline_engine import FirstStageEngine
from spmd_rl.rollout.types import Completion, SamplingParams
from tests.distributed.launcher import run_on_ranks

torch.set_num_threads(1)


class RecordingEngine:
    def __init__(self):
        self.calls, self.loaded, self.last_stats = [], [], {"num_steps": 3.0}

    def generate(self, prompts, params, seeds=None):
        self.calls.append((prompts, seeds))
        return [[Completion([p[0] + 1, 7], [-0.5, -0.25], finish_reason="stop")] for p in prompts]

    def update_weights(self, named):
        self.loaded = [name for name, _ in named]

    def sleep(self):
        pass

    def wake_up(self):
        pass


def _worker(rank, world_size, out_path):
    inner = RecordingEngine() if rank == 0 else None
    engine = FirstStageEngine(inner, dist.group.WORLD, rank)
    got = engine.generate([[1, 2], [5]], SamplingParams(n=1, max_new_tokens=2), seeds=[3, 4])
    drained = []

    def stream():  # stands for the gathered weights: each item a step every rank takes
        for name in ("a", "b"):
            drained.append(name)
            yield name, torch.zeros(1)

    engine.update_weights(stream())
    engine.sleep()
    engine.wake_up()
    report = [None] * world_size
    dist.all_gather_object(report, ([c[0].token_ids for c in got], engine.last_stats, drained,
                                    inner.calls if inner else None, inner.loaded if inner else None))
    if rank == 0:
        torch.save(report, out_path)


def test_first_stage_generates_and_every_stage_gets_its_tokens(tmp_path):
    run_on_ranks(_worker, 2, str(tmp_path / "out.pt"))
    (tokens0, stats0, drained0, calls, loaded), (tokens1, stats1, drained1, none_calls, _) = \
        torch.load(tmp_path / "out.pt", weights_only=False)
    assert tokens0 == tokens1 == [[2, 7], [6, 7]]
    assert stats0 == stats1 == {"num_steps": 3.0}  # rollout metrics are the generating stage's
    assert calls == [([[1, 2], [5]], [3, 4])] and none_calls is None  # one generation per pipeline
    assert loaded == ["a", "b"] and drained0 == drained1 == ["a", "b"]


def test_only_the_first_stage_holds_the_engine():
    with pytest.raises(ValueError, match="the first pipeline stage, and only it, holds the engine"):
        FirstStageEngine(None, None, 0)
