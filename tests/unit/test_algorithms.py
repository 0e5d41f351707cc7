"""Algorithms v0 against straightforward references of verl's formulas.

The references below loop over samples/groups/tokens in plain Python floats on purpose: they
share no code (and no vectorisation trick) with spmd_rl.algorithms.
"""

from __future__ import annotations

import ast
import math
import statistics
import tempfile
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

torch.set_num_threads(1)

from spmd_rl.algorithms import (  # noqa: E402
    AGG_MODES,
    aggregate_loss,
    entropy_from_logits,
    get_advantage_estimator,
    get_policy_loss,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
)

ALGORITHMS_DIR = Path(__file__).resolve().parents[2] / "spmd_rl" / "algorithms"


# ----------------------------------------------------------------------------- inputs


def ragged_mask(batch: int, length: int, gen: torch.Generator, empty_rows: tuple[int, ...] = ()) -> torch.Tensor:
    """[B, T] 0/1 mask whose row i has a random length in [1, T] (0 for ``empty_rows``)."""
    lengths = torch.randint(1, length + 1, (batch,), generator=gen)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).to(torch.float64)
    for row in empty_rows:
        mask[row] = 0.0
    return mask


def outcome_rewards(scores: list[float], mask: torch.Tensor) -> torch.Tensor:
    """[B, T] with each score on the last valid token, as the reward manager lays it out."""
    rewards = torch.zeros_like(mask)
    for i, score in enumerate(scores):
        last = int(mask[i].sum().item()) - 1
        rewards[i, last] = score
    return rewards


# ----------------------------------------------------------------------------- references


def ref_grpo(scores: list[float], index: list[int], norm_by_std: bool, eps: float) -> list[float]:
    """verl compute_grpo_outcome_advantage, one scalar per sample."""
    groups: dict[int, list[float]] = {}
    for score, idx in zip(scores, index):
        groups.setdefault(idx, []).append(score)
    out = []
    for score, idx in zip(scores, index):
        members = groups[idx]
        mean, std = (0.0, 1.0) if len(members) == 1 else (statistics.mean(members), statistics.stdev(members))
        out.append((score - mean) / (std + eps) if norm_by_std else score - mean)
    return out


def ref_token_loss(lp: float, old: float, adv: float, lo: float, hi: float, c: float) -> tuple[float, bool, bool]:
    """verl vanilla PPO loss of one token -> (loss, ppo clip active, dual clip active)."""
    log_ratio = min(max(lp - old, -20.0), 20.0)
    ratio = math.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * min(max(ratio, 1 - lo), 1 + hi)
    ppo = max(unclipped, clipped)
    if adv < 0:
        return min(ppo, -adv * c), clipped > unclipped, ppo > -adv * c
    return ppo, clipped > unclipped, False


def ref_aggregate(loss: list[list[float]], mask: list[list[float]], mode: str, scale_factor=None) -> float:
    """verl agg_loss with local (single-process) denominators."""
    rows = [(sum(l * m for l, m in zip(lr, mr)), sum(mr)) for lr, mr in zip(loss, mask)]
    if mode == "token-mean":
        return sum(s for s, _ in rows) / sum(n for _, n in rows)
    valid = [(s, n) for s, n in rows if n > 0]
    if mode == "seq-mean-token-sum":
        return sum(s for s, _ in valid) / len(valid)
    if mode == "seq-mean-token-mean":
        return sum(s / (n + 1e-8) for s, n in valid) / len(valid)  # verl keeps a 1e-8 guard
    assert mode == "seq-mean-token-sum-norm"
    return sum(s for s, _ in valid) / len(valid) / (scale_factor or len(mask[0]))


# ----------------------------------------------------------------------------- masked


def test_masked_reductions_match_reference():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    mask = ragged_mask(5, 7, gen)
    x_nan = torch.where(mask.bool(), x, torch.full_like(x, float("nan")))  # padding must not leak
    vals = [x[i, j].item() for i in range(5) for j in range(7) if mask[i, j]]

    assert masked_sum(x_nan, mask).item() == pytest.approx(sum(vals), abs=1e-12)
    # rel 1e-7: verl's mean divides by (count + 1e-8)
    assert masked_mean(x_nan, mask).item() == pytest.approx(statistics.mean(vals), rel=1e-7)
    assert masked_var(x, mask).item() == pytest.approx(statistics.variance(vals), rel=1e-7)
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(statistics.pvariance(vals), rel=1e-7)
    row_means = masked_mean(x_nan, mask, dim=-1)
    for i in range(5):
        row = [x[i, j].item() for j in range(7) if mask[i, j]]
        assert row_means[i].item() == pytest.approx(statistics.mean(row), rel=1e-7)

    white = masked_whiten(x, mask)
    mean, std = statistics.mean(vals), statistics.stdev(vals)
    expect = (x - mean) / math.sqrt(std**2 + 1e-8)
    torch.testing.assert_close(white, expect, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(masked_whiten(x, mask, shift_mean=False), expect + mean, rtol=1e-7, atol=1e-7)


def test_masked_var_rejects_fewer_than_two_elements():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="selects one element"):
        masked_var(x, torch.tensor([[1.0, 0, 0], [0, 0, 0]]))
    with pytest.raises(ValueError, match="selects no element"):
        masked_var(x, torch.zeros(2, 3))


def _whiten_worker(rank: int, init_file: str, x: torch.Tensor, mask: torch.Tensor, out_dir: str) -> None:
    import torch.distributed as dist

    from spmd_rl.distributed.init import exit_worker

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    rows = slice(0, 3) if rank == 0 else slice(3, 8)  # unequal shards on purpose
    white = masked_whiten(x[rows], mask[rows], dp_group=dist.group.WORLD)
    torch.save(white, f"{out_dir}/white{rank}.pt")
    dist.destroy_process_group()
    exit_worker(0)


@pytest.mark.slow
def test_masked_whiten_over_dp_group_equals_full_batch():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 5, generator=gen, dtype=torch.float64)
    mask = ragged_mask(8, 5, gen)
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_whiten_worker, args=(f"{tmp}/init", x, mask, tmp), nprocs=2, join=True)
        sharded = torch.cat([torch.load(f"{tmp}/white{r}.pt") for r in range(2)])
    torch.testing.assert_close(sharded, masked_whiten(x, mask), rtol=0, atol=1e-12)


def test_algorithms_do_not_import_torch_distributed_at_module_level():
    for path in ALGORITHMS_DIR.glob("*.py"):
        for node in ast.parse(path.read_text()).body:  # module-level statements only
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            assert not any(n.startswith("torch.distributed") for n in names), f"{path.name}: {ast.dump(node)}"


# ----------------------------------------------------------------------------- GRPO


@pytest.mark.parametrize("norm_by_std", [True, False])
def test_grpo_matches_reference(norm_by_std):
    gen = torch.Generator().manual_seed(2)
    # groups of 4, 3, 1 (singleton), 4 and 2, interleaved: grouping is by value, not position
    index = [7, 3, 7, 3, 9, 7, 3, 5, 5, 5, 7, 5, 11, 11]
    scores = [float(s) for s in torch.randint(0, 3, (len(index),), generator=gen)]
    scores[12] = scores[13] = 1.0  # a group with zero std: eps keeps the division finite
    mask = ragged_mask(len(index), 9, gen)
    rewards = outcome_rewards(scores, mask)

    grpo = get_advantage_estimator("grpo")
    adv, ret = grpo(rewards, mask, group_index=torch.tensor(index), norm_by_std=norm_by_std, eps=1e-6)
    expect = ref_grpo(scores, index, norm_by_std, eps=1e-6)
    for i, value in enumerate(expect):
        torch.testing.assert_close(adv[i], value * mask[i], rtol=1e-6, atol=1e-6)
    assert adv.data_ptr() == ret.data_ptr() or torch.equal(adv, ret)
    assert adv[4, 0].item() == pytest.approx(scores[4] / (1 + 1e-6))  # singleton: mean 0, std 1
    assert torch.all(adv[12:] == 0)


def test_grpo_float32_matches_reference_and_requires_group_index():
    gen = torch.Generator().manual_seed(3)
    index = [0, 0, 0, 1, 1, 2, 2, 2, 2]
    scores = torch.rand(len(index), generator=gen).tolist()
    mask = ragged_mask(len(index), 6, gen).float()
    adv, _ = get_advantage_estimator("grpo")(outcome_rewards(scores, mask), mask, group_index=torch.tensor(index))
    assert adv.dtype == torch.float32
    expect = torch.tensor(ref_grpo(scores, index, True, 1e-6), dtype=torch.float32)[:, None] * mask
    torch.testing.assert_close(adv, expect, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="grpo needs group_index"):
        get_advantage_estimator("grpo")(outcome_rewards(scores, mask), mask)


def test_unknown_estimator_lists_valid_names():
    with pytest.raises(ValueError, match=r"^unknown advantage estimator 'gae_typo'; valid names: .*grpo"):
        get_advantage_estimator("gae_typo")


# ----------------------------------------------------------------------------- vanilla loss


def loss_inputs(seed: int, batch: int = 8, length: int = 6):
    """float64 inputs where every branch occurs: clip high/low, dual clip, |log-ratio| > 20."""
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(batch, length, generator=gen, dtype=torch.float64) * 3
    logprobs = old + torch.randn(batch, length, generator=gen, dtype=torch.float64) * 0.6
    logprobs[0, 0] = old[0, 0] + 2.0  # ratio e^2 > clip_c
    logprobs[1, 0] = old[1, 0] + 25.0  # log-ratio clamped to 20
    logprobs[1, 1] = old[1, 1] - 25.0
    advantages = torch.randn(batch, length, generator=gen, dtype=torch.float64)
    advantages[0, 0] = advantages[1, 0] = -1.5  # dual clip branch
    mask = ragged_mask(batch, length, gen, empty_rows=(batch - 1,))
    mask[0, 0] = mask[1, :2] = 1.0
    return logprobs, old, advantages, mask


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("clip_low,clip_high", [(0.2, 0.2), (0.2, 0.28)])
def test_vanilla_loss_and_metrics_match_reference(mode, clip_low, clip_high):
    logprobs, old, adv, mask = loss_inputs(seed=4)
    loss, metrics = get_policy_loss("vanilla")(
        logprobs, old, adv, mask, clip_low=clip_low, clip_high=clip_high, clip_c=3.0, agg_mode=mode
    )
    B, T = mask.shape
    token = [
        [ref_token_loss(logprobs[i, j].item(), old[i, j].item(), adv[i, j].item(), clip_low, clip_high, 3.0)
         for j in range(T)]
        for i in range(B)
    ]
    m = mask.tolist()
    assert loss.item() == pytest.approx(ref_aggregate([[t[0] for t in r] for r in token], m, mode), abs=1e-10)

    n = sum(map(sum, m))
    clipfrac = sum(token[i][j][1] for i in range(B) for j in range(T) if m[i][j]) / n
    lower = sum(token[i][j][2] for i in range(B) for j in range(T) if m[i][j]) / n
    kl = sum(
        min(max(old[i, j].item() - logprobs[i, j].item(), -20), 20) for i in range(B) for j in range(T) if m[i][j]
    )
    assert lower > 0 and clipfrac > 0  # both branches exercised
    assert set(metrics) == {"pg_clipfrac", "pg_clipfrac_lower", "ppo_kl"}
    assert all(v.dim() == 0 and not v.requires_grad for v in metrics.values())
    assert metrics["pg_clipfrac"].item() == pytest.approx(clipfrac, abs=1e-7)
    assert metrics["pg_clipfrac_lower"].item() == pytest.approx(lower, abs=1e-7)
    assert metrics["ppo_kl"].item() == pytest.approx(kl / n, abs=1e-7)


def test_clip_high_differs_from_clip_low():
    # a single token with ratio 1.25 and A > 0: clipped at 1.2 by (0.2, 0.2), not by (0.2, 0.28)
    lp, old, adv, mask = (torch.tensor([[math.log(1.25)]]), torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1))
    sym, m_sym = get_policy_loss("vanilla")(lp, old, adv, mask, clip_low=0.2, clip_high=0.2)
    asym, m_asym = get_policy_loss("vanilla")(lp, old, adv, mask, clip_low=0.2, clip_high=0.28)
    assert sym.item() == pytest.approx(-1.2) and m_sym["pg_clipfrac"].item() == 1.0
    assert asym.item() == pytest.approx(-1.25) and m_asym["pg_clipfrac"].item() == 0.0


def test_dual_clip_caps_negative_advantage_loss():
    lp, old, mask = torch.tensor([[math.log(5.0)]]), torch.zeros(1, 1), torch.ones(1, 1)
    loss, metrics = get_policy_loss("vanilla")(lp, old, -2 * torch.ones(1, 1), mask, clip_c=3.0)
    assert loss.item() == pytest.approx(6.0)  # -A * clip_c, not -A * 5
    assert metrics["pg_clipfrac_lower"].item() == 1.0
    with pytest.raises(ValueError, match="clip_c must be > 1.0"):
        get_policy_loss("vanilla")(lp, old, torch.ones(1, 1), mask, clip_c=1.0)


def test_seq_mean_token_sum_norm_scale_factor():
    loss_mat = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    assert aggregate_loss(loss_mat, mask, "seq-mean-token-sum-norm").item() == pytest.approx(3.0 / 4)
    assert aggregate_loss(loss_mat, mask, "seq-mean-token-sum-norm", scale_factor=10).item() == pytest.approx(0.3)
    # mode_options of the policy loss forward scale_factor
    loss, _ = get_policy_loss("vanilla")(
        torch.zeros(1, 4), torch.zeros(1, 4), -loss_mat, mask, agg_mode="seq-mean-token-sum-norm", scale_factor=10
    )
    assert loss.item() == pytest.approx(0.3)


def test_unknown_policy_loss_and_agg_mode_list_valid_names():
    with pytest.raises(ValueError, match=r"^unknown policy loss 'vanila'; valid names: .*vanilla"):
        get_policy_loss("vanila")
    expected = (
        "unknown loss aggregation mode 'seq-sum'; valid modes: token-mean, seq-mean-token-sum, "
        "seq-mean-token-mean, seq-mean-token-sum-norm"
    )
    with pytest.raises(ValueError) as info:
        aggregate_loss(torch.zeros(1, 2), torch.ones(1, 2), "seq-sum")
    assert str(info.value) == expected


# ----------------------------------------------------------------------------- invariance


def global_counts(mask: torch.Tensor) -> dict[str, int]:
    """What the trainer all-reduces before the update: valid tokens and non-empty sequences."""
    return {"global_tokens": int(mask.sum()), "global_seqs": int((mask.sum(-1) > 0).sum())}


@pytest.mark.parametrize("mode", AGG_MODES)
def test_shards_times_micro_batches_sum_to_full_batch(mode):
    """2 dp shards x 2 micro-batches (unequal rows) with global counts == the full batch, loss and grad."""
    logprobs, old, adv, mask = loss_inputs(seed=5, batch=10, length=7)
    loss_fn = get_policy_loss("vanilla")
    opts = dict(clip_low=0.2, clip_high=0.28, clip_c=3.0, agg_mode=mode)

    full_lp = logprobs.clone().requires_grad_(True)
    full_loss, _ = loss_fn(full_lp, old, adv, mask, **opts)  # local denominators == global here
    full_loss.backward()

    split_lp = logprobs.clone().requires_grad_(True)
    counts = global_counts(mask)
    pieces = [slice(0, 2), slice(2, 5), slice(5, 6), slice(6, 10)]  # shard 0: rows 0-4, shard 1: rows 5-9
    total = 0.0
    for rows in pieces:
        piece_loss, _ = loss_fn(split_lp[rows], old[rows], adv[rows], mask[rows], **opts, **counts)
        piece_loss.backward()  # gradients accumulate as in grad accumulation + a dp all-reduce(sum)
        total = total + piece_loss.detach()
    assert total.item() == pytest.approx(full_loss.item(), abs=1e-6)
    torch.testing.assert_close(split_lp.grad, full_lp.grad, rtol=0, atol=1e-6)
    assert full_lp.grad.abs().sum() > 0


def test_all_padding_micro_batch_gives_zero_not_nan():
    for mode in AGG_MODES:
        assert aggregate_loss(torch.ones(2, 3), torch.zeros(2, 3), mode).item() == 0.0


def test_entropy_from_logits():
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(3, 4, 11, generator=gen, dtype=torch.float64) * 4
    probs = torch.softmax(logits, dim=-1)
    torch.testing.assert_close(entropy_from_logits(logits), -(probs * probs.log()).sum(-1), rtol=0, atol=1e-10)
    assert entropy_from_logits(torch.zeros(5)).item() == pytest.approx(math.log(5))
