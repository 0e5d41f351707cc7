"""Trainer building blocks: LR schedule, gradient clipping, rollout batch, scoring inputs."""

import math

import pytest
import torch

from spmd_rl.distributed.collectives import clip_grad_norm_
from spmd_rl.models import ModelArgs, build_model
from spmd_rl.rollout.types import Completion
from spmd_rl.trainer.batch import build_rollout_batch
from spmd_rl.trainer.optim import compute_lr_factor
from spmd_rl.trainer.policy import PolicyModel, build_scoring_inputs, pad_by_lengths

torch.set_num_threads(1)


def test_lr_warmup_then_cosine_to_floor():
    f = lambda s: compute_lr_factor(s, warmup_steps=4, total_steps=14, schedule="cosine", min_lr_ratio=0.1)  # noqa: E731
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(9) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(14) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)
    assert compute_lr_factor(50, warmup_steps=0, total_steps=10, schedule="constant", min_lr_ratio=0.0) == 1.0


def test_clip_grad_norm_matches_torch():
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    for p, q in zip(a, b):
        g = torch.randn_like(p)
        p.grad, q.grad = g.clone(), g.clone()
    ours = clip_grad_norm_(a, 0.5)
    ref = torch.nn.utils.clip_grad_norm_(b, 0.5).item()
    assert ours == pytest.approx(ref, rel=1e-6)
    for p, q in zip(a, b):
        assert torch.allclose(p.grad, q.grad, atol=1e-6)


def test_rollout_batch_places_score_on_last_token_and_selects():
    completions = [[Completion([5, 6, 7], [-1.0, -2.0, -3.0], "stop"), Completion([8], [-0.5], "length")],
                   [Completion([9, 9], [-0.1, -0.2], "stop"), Completion([4, 4, 4, 4], [-1, -1, -1, -1], "length")]]
    batch = build_rollout_batch([[1, 2], [3]], completions)
    assert batch.group_index.tolist() == [0, 0, 1, 1]
    assert batch.response_mask.tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    batch.scores = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert batch.token_scores().tolist() == [[0, 0, 1, 0], [2, 0, 0, 0], [0, 3, 0, 0], [0, 0, 0, 4]]
    part = batch.select([1, 2])
    assert part.response_mask.shape == (2, 2) and part.prompt_ids == [[1, 2], [3]]
    assert torch.equal(part.rollout_logprobs, torch.tensor([[-0.5, 0.0], [-0.1, -0.2]]))


def test_policy_logprobs_equal_full_forward_log_softmax():
    args = ModelArgs(architecture="LlamaForCausalLM", model_type="llama", vocab_size=50, hidden_size=32,
                     intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
    model = build_model(None, args=args, seed=1)
    prompts, responses = [[1, 2, 3], [4, 5]], [[6, 7], [8, 9, 10]]
    inputs = build_scoring_inputs(prompts, responses, "cpu")
    with torch.no_grad():
        lp, _ = PolicyModel(model)(inputs, temperature=0.7)
        padded = pad_by_lengths(lp, inputs.response_lengths, 3)
        for i, (p, r) in enumerate(zip(prompts, responses)):
            ids = torch.tensor([p + r])
            logits = model.compute_logits(model(ids, torch.arange(ids.shape[1])[None]))[0] / 0.7
            ref = torch.log_softmax(logits.float(), -1)[len(p) - 1 : -1].gather(-1, torch.tensor(r)[:, None])[:, 0]
            assert torch.allclose(padded[i, : len(r)], ref, atol=1e-5)
            assert padded[i, len(r):].abs().sum() == 0
