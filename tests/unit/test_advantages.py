"""Advantage estimators: hand-computed cases, per-sample loop references of verl's semantics,
properties, data-parallel equality and input errors."""

from __future__ import annotations

import inspect
import math
import statistics

import pytest
import torch

from spmd_rl.algorithms.advantages import ADVANTAGE_ESTIMATORS, get_advantage_estimator
from tests.distributed.launcher import run_on_ranks

torch.set_num_threads(1)

NAMES = {"gae", "grpo", "rloo", "reinforce_plus_plus", "reinforce_plus_plus_baseline", "remax", "opo", "gpg",
         "grpo_passk"}
F64 = torch.float64
SQRT2 = math.sqrt(2.0)


def t64(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=F64)


def close(actual: torch.Tensor, expected, atol: float = 1e-6) -> None:
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


# ----------------------------------------------------------------------------- hand-computed cases
# B=4, T=3, groups {7: rows 0-1, 3: rows 2-3}; scores 1, 0, 3, 1 on each row's last response token.
MASK = t64([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]])
OUTCOME = t64([[0, 0, 1], [0, 0, 0], [3, 0, 0], [0, 0, 1]])
GROUPS = torch.tensor([7, 7, 3, 3])


def per_row(scalars) -> torch.Tensor:
    """One advantage per response, on its response tokens."""
    return t64(scalars)[:, None] * MASK


def call(name: str, rewards=OUTCOME, mask=MASK, **kwargs):
    return get_advantage_estimator(name)(rewards, mask, **kwargs)


def test_grpo_hand_case():
    adv, ret = call("grpo", group_index=GROUPS, eps=0.0)
    # group 7: mean 0.5, std sqrt(0.5); group 3: mean 2, std sqrt(2)
    close(adv, per_row([1 / SQRT2, -1 / SQRT2, 1 / SQRT2, -1 / SQRT2]))
    assert ret is adv
    adv, _ = call("grpo", group_index=GROUPS, norm_by_std=False)
    close(adv, per_row([0.5, -0.5, 1.0, -1.0]))


def test_rloo_hand_case():
    adv, ret = call("rloo", group_index=GROUPS)
    close(adv, per_row([1.0, -1.0, 2.0, -2.0]))  # pairs: s_i - s_other
    close(ret, adv)


def test_opo_hand_case():
    adv, _ = call("opo", group_index=GROUPS)
    # lengths 3, 2, 1, 3: baselines (3*1 + 2*0) / 5 = 0.6 and (1*3 + 3*1) / 4 = 1.5
    close(adv, per_row([0.4, -0.6, 1.5, -0.5]))


def test_gpg_hand_case():
    adv, _ = call("gpg", group_index=GROUPS)
    alpha = 4 / 3  # B = 4, three non-zero scores
    close(adv, per_row([alpha * 0.5, -alpha * 0.5, alpha * 1.0, -alpha * 1.0]))


def test_grpo_passk_hand_case():
    adv, _ = call("grpo_passk", group_index=GROUPS, eps=0.0)
    # best of group 7: row 0, gap 1, std sqrt(0.5); best of group 3: row 2, gap 2, std sqrt(2)
    close(adv, per_row([SQRT2, 0.0, SQRT2, 0.0]))
    adv, _ = call("grpo_passk", group_index=GROUPS, norm_by_std=False)
    close(adv, per_row([1.0, 0.0, 2.0, 0.0]))


def test_grpo_passk_tied_best_gets_nothing():
    rewards = t64([[1.0], [1.0], [0.0], [2.0], [0.5]])
    adv, _ = get_advantage_estimator("grpo_passk")(rewards, torch.ones_like(rewards),
                                                   group_index=torch.tensor([0, 0, 0, 1, 1]), norm_by_std=False)
    close(adv, [[0.0], [0.0], [0.0], [1.5], [0.0]])


def test_reinforce_plus_plus_baseline_hand_case():
    adv, ret = call("reinforce_plus_plus_baseline", group_index=GROUPS)
    # centred 0.5, -0.5, 1, -1 on 3 + 2 + 1 + 3 tokens: mean -1/6, unbiased variance 5/8
    std = math.sqrt(5 / 8)
    centred = [0.5, -0.5, 1.0, -1.0]
    close(adv, per_row([(c + 1 / 6) / std for c in centred]))
    close(ret, adv)


def test_remax_hand_case():
    rewards = t64([[1, 0, 2], [0, 1, 5], [3, 0, 0], [0, 0, 1]])  # 5 sits on padding: ignored
    adv, ret = call("remax", rewards, reward_baselines=t64([0.5, 0.5, 2.0, 2.0]))
    close(ret, [[3, 2, 2], [1, 1, 0], [3, 0, 0], [1, 1, 1]])
    close(adv, [[2.5, 1.5, 1.5], [0.5, 0.5, 0], [1, 0, 0], [-1, -1, -1]])


def test_reinforce_plus_plus_hand_case():
    rewards = t64([[1, 0, 2], [0, 1, 4]])
    mask = t64([[1, 1, 1], [1, 1, 0]])
    adv, ret = call("reinforce_plus_plus", rewards, mask, gamma=0.5)
    # row 1: the padded 4 is its own return but is reset before reaching the response
    close(ret, [[1.5, 1.0, 2.0], [0.5, 1.0, 4.0]])
    valid = [1.5, 1.0, 2.0, 0.5, 1.0]
    mean, std = statistics.mean(valid), statistics.stdev(valid)  # 1.2, sqrt(0.325)
    close(adv, [[(x - mean) / std for x in (1.5, 1.0, 2.0)], [(0.5 - mean) / std, (1.0 - mean) / std, 0.0]])


def test_gae_hand_case():
    rewards = t64([[0, 0, 1], [0, 5, 1]])
    values = t64([[1, 2, 0.5], [1, 9, 0.5]])
    mask = t64([[1, 1, 1], [1, 0, 1]])  # row 1: an observation token in the middle
    adv, ret = call("gae", rewards, mask, values=values, gamma=0.5, lam=0.5)
    # row 0: deltas 0, -1.75, 0.5 -> A = -0.40625, -1.625, 0.5
    # row 1: t=1 is skipped and reports the carried A=0.5; t=0 uses V_next=0.5: delta -0.75, A -0.625
    raw = [[-0.40625, -1.625, 0.5], [-0.625, 0.5, 0.5]]
    close(ret, [[0.59375, 0.375, 1.0], [0.375, 9.5, 1.0]])
    valid = [-0.40625, -1.625, 0.5, -0.625, 0.5]
    mean, std = statistics.mean(valid), statistics.stdev(valid)
    # whitened everywhere, padding included (not multiplied by the mask)
    close(adv, [[(x - mean) / std for x in row] for row in raw])


# ----------------------------------------------------------------------------- loop references
# Per-sample Python loops over plain floats, following verl's core_algos step by step.


def ref_group_lists(scores, index):
    groups: dict[int, list[int]] = {}
    for i, g in enumerate(index):
        groups.setdefault(g, []).append(i)
    return groups


def ref_mean_std(values):
    if len(values) == 1:
        return 0.0, 1.0
    return statistics.mean(values), statistics.stdev(values)


def ref_whiten(mat, mask):
    valid = [x for row, mrow in zip(mat, mask) for x, m in zip(row, mrow) if m]
    n = len(valid)
    mean = sum(valid) / n
    var = sum((x - mean) ** 2 for x in valid) / n * n / (n - 1)
    return [[(x - mean) / math.sqrt(var + 1e-8) for x in row] for row in mat]


def ref_broadcast(scalars, mask):
    return [[s * m for m in mrow] for s, mrow in zip(scalars, mask)]


def ref_gae(rewards, values, mask, gamma, lam):
    raw, returns = [], []
    for r, v, m in zip(rewards, values, mask):
        next_value, last, out = 0.0, 0.0, [0.0] * len(r)
        for t in reversed(range(len(r))):
            delta = r[t] + gamma * next_value - v[t]
            if m[t]:
                next_value = v[t]
                last = delta + gamma * lam * last
            out[t] = last
        raw.append(out)
        returns.append([a + b for a, b in zip(out, v)])
    return ref_whiten(raw, mask), returns


def ref_grpo(rewards, mask, index, norm_by_std, eps):
    scores = [sum(r) for r in rewards]
    groups = ref_group_lists(scores, index)
    out = []
    for i, s in enumerate(scores):
        mean, std = ref_mean_std([scores[j] for j in groups[index[i]]])
        out.append((s - mean) / (std + eps) if norm_by_std else s - mean)
    return ref_broadcast(out, mask)


def ref_rloo(rewards, mask, index):
    scores = [sum(r) for r in rewards]
    groups = ref_group_lists(scores, index)
    out = []
    for i, s in enumerate(scores):
        members = groups[index[i]]
        n = len(members)
        mean = statistics.mean(scores[j] for j in members)
        out.append(s * n / (n - 1) - mean * n / (n - 1) if n > 1 else s)
    return ref_broadcast(out, mask)


def ref_reinforce_pp(rewards, mask, gamma):
    returns = []
    for r, m in zip(rewards, mask):
        running, out = 0.0, [0.0] * len(r)
        for t in reversed(range(len(r))):
            running = r[t] + gamma * running
            out[t] = running
            running *= m[t]
        returns.append(out)
    adv = [[a * m for a, m in zip(row, mrow)] for row, mrow in zip(ref_whiten(returns, mask), mask)]
    return adv, returns


def ref_reinforce_pp_baseline(rewards, mask, index):
    scores = [sum(r) for r in rewards]
    groups = ref_group_lists(scores, index)
    centred = [s - ref_mean_std([scores[j] for j in groups[index[i]]])[0] for i, s in enumerate(scores)]
    tiled = ref_broadcast(centred, mask)
    return [[a * m for a, m in zip(row, mrow)] for row, mrow in zip(ref_whiten(tiled, mask), mask)]


def ref_remax(rewards, mask, baselines):
    returns = []
    for r, m in zip(rewards, mask):
        out, acc = [0.0] * len(r), 0.0
        for t in reversed(range(len(r))):
            acc += r[t] * m[t]
            out[t] = acc
        returns.append(out)
    adv = [[g - b * mm for g, mm in zip(row, mrow)] for row, mrow, b in zip(returns, mask, baselines)]
    return adv, returns


def ref_opo(rewards, mask, index):
    scores = [sum(r) for r in rewards]
    lengths = [sum(m) for m in mask]
    groups = ref_group_lists(scores, index)
    out = []
    for i, s in enumerate(scores):
        members = groups[index[i]]
        bsl = 0.0
        if len(members) > 1:
            bsl = sum(lengths[j] * scores[j] for j in members) / sum(lengths[j] for j in members)
        out.append(s - bsl)
    return ref_broadcast(out, mask)


def ref_gpg(rewards, mask, index):
    scores = [sum(r) for r in rewards]
    alpha = len(scores) / max(sum(1 for s in scores if s != 0), 1)
    groups = ref_group_lists(scores, index)
    out = [alpha * (s - ref_mean_std([scores[j] for j in groups[index[i]]])[0]) for i, s in enumerate(scores)]
    return ref_broadcast(out, mask)


def ref_passk(rewards, mask, index, norm_by_std, eps):
    scores = [sum(r) for r in rewards]
    out = [0.0] * len(scores)
    for members in ref_group_lists(scores, index).values():
        ranked = sorted(members, key=lambda j: scores[j], reverse=True)
        gap = scores[ranked[0]] - scores[ranked[1]]
        if norm_by_std:
            gap /= statistics.stdev(scores[j] for j in members) + eps
        out[ranked[0]] = gap
    return ref_broadcast(out, mask)


def ragged_batch(seed: int, batch: int = 14, length: int = 9):
    """Random float64 inputs: right padding, some interior holes, discrete + dense rewards."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (batch,), generator=gen)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).to(F64)
    holes = (torch.rand(batch, length, generator=gen) < 0.15) & (torch.arange(length) > 0)
    mask[holes] = 0.0
    mask[:, 0] = 1.0  # every response has a token
    rewards = torch.randn(batch, length, generator=gen, dtype=F64) * 0.1 * mask
    # outcome-like scores with ties and zeros on the first token, plus rows with no reward at all
    rewards[:, 0] = torch.randint(0, 3, (batch,), generator=gen).to(F64) / 2
    rewards[::5] = 0.0
    values = torch.randn(batch, length, generator=gen, dtype=F64)
    baselines = torch.randn(batch, generator=gen, dtype=F64)
    return rewards, mask, values, baselines


# groups of 1-4 responses, not contiguous in the batch
INDEX = [5, 5, 2, 9, 2, 5, 9, 1, 2, 3, 3, 8, 8, 5]
PAIRED = [5, 5, 2, 9, 2, 5, 9, 2, 2, 3, 3, 8, 8, 5]  # no singleton, for grpo_passk


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_estimators_match_loop_references(seed):
    rewards, mask, values, baselines = ragged_batch(seed)
    r, m, v, b = rewards.tolist(), mask.tolist(), values.tolist(), baselines.tolist()
    idx, paired = torch.tensor(INDEX), torch.tensor(PAIRED)

    adv, ret = call("gae", rewards, mask, values=values, gamma=0.9, lam=0.8)
    ref_adv, ref_ret = ref_gae(r, v, m, 0.9, 0.8)
    close(adv, ref_adv)
    close(ret, ref_ret)
    for norm in (True, False):
        close(call("grpo", rewards, mask, group_index=idx, norm_by_std=norm)[0], ref_grpo(r, m, INDEX, norm, 1e-6))
        close(call("grpo_passk", rewards, mask, group_index=paired, norm_by_std=norm)[0],
              ref_passk(r, m, PAIRED, norm, 1e-6))
    close(call("rloo", rewards, mask, group_index=idx)[0], ref_rloo(r, m, INDEX))
    adv, ret = call("reinforce_plus_plus", rewards, mask, gamma=0.95)
    ref_adv, ref_ret = ref_reinforce_pp(r, m, 0.95)
    close(adv, ref_adv)
    close(ret, ref_ret)
    close(call("reinforce_plus_plus_baseline", rewards, mask, group_index=idx)[0],
          ref_reinforce_pp_baseline(r, m, INDEX))
    adv, ret = call("remax", rewards, mask, reward_baselines=baselines)
    ref_adv, ref_ret = ref_remax(r, m, b)
    close(adv, ref_adv)
    close(ret, ref_ret)
    close(call("opo", rewards, mask, group_index=idx)[0], ref_opo(r, m, INDEX))
    close(call("gpg", rewards, mask, group_index=idx)[0], ref_gpg(r, m, INDEX))


@pytest.mark.parametrize("name", sorted(NAMES))
def test_float32_in_float32_out_and_no_grad(name):
    rewards, mask, values, baselines = ragged_batch(3)
    kwargs = dict(values=values, group_index=torch.tensor(PAIRED), reward_baselines=baselines)
    expected = get_advantage_estimator(name)(rewards, mask, **kwargs)
    r32 = rewards.float().requires_grad_()
    kwargs32 = {k: (x.float() if x.is_floating_point() else x) for k, x in kwargs.items()}
    adv, ret = get_advantage_estimator(name)(r32, mask.float(), **kwargs32)
    assert adv.dtype == ret.dtype == torch.float32 and adv.shape == ret.shape == rewards.shape
    assert not adv.requires_grad and not ret.requires_grad
    close(adv.double(), expected[0], atol=1e-5)
    close(ret.double(), expected[1], atol=1e-5)


# ----------------------------------------------------------------------------- properties


@pytest.mark.parametrize("norm", [True, False])
def test_grpo_advantages_sum_to_zero_per_group(norm):
    rewards, mask, _, _ = ragged_batch(4)
    adv, _ = call("grpo", rewards, torch.ones_like(mask), group_index=torch.tensor(INDEX), norm_by_std=norm)
    per_sample = adv[:, 0]
    for g in set(INDEX):
        members = [i for i, x in enumerate(INDEX) if x == g]
        if len(members) > 1:
            assert abs(per_sample[members].sum().item()) < 1e-9


def test_rloo_is_score_minus_mean_of_the_others():
    rewards, mask, _, _ = ragged_batch(5)
    adv, _ = call("rloo", rewards, mask, group_index=torch.tensor(INDEX))
    scores = rewards.sum(-1)
    for i, g in enumerate(INDEX):
        others = [scores[j].item() for j, h in enumerate(INDEX) if h == g and j != i]
        expected = scores[i].item() - (statistics.mean(others) if others else 0.0)
        close(adv[i], expected * mask[i])


def test_remax_returns_are_masked_reward_to_go():
    rewards, mask, _, baselines = ragged_batch(6)
    adv, ret = call("remax", rewards, mask, reward_baselines=baselines)
    close(ret[:, 0], (rewards * mask).sum(-1))
    close(ret[:, :-1] - ret[:, 1:], (rewards * mask)[:, :-1])
    close(adv, ret - baselines[:, None] * mask)


def test_gae_lambda_gamma_one_zero_values_is_reward_to_go():
    rewards, mask, _, baselines = ragged_batch(7)
    adv, ret = call("gae", rewards, mask, values=torch.zeros_like(rewards), gamma=1.0, lam=1.0)
    _, reward_to_go = call("remax", rewards, mask, reward_baselines=baselines)
    close(ret, reward_to_go)  # with V = 0 the returns are the raw (unwhitened) advantages
    valid = ret[mask.bool()]
    close(adv, (ret - valid.mean()) / valid.std())


def test_registry_and_one_signature():
    assert set(ADVANTAGE_ESTIMATORS) == NAMES and len(ADVANTAGE_ESTIMATORS) == 9
    expected = inspect.signature(get_advantage_estimator("grpo"))
    for name, fn in ADVANTAGE_ESTIMATORS.items():
        assert inspect.signature(fn) == expected, name
        assert "arXiv:" in fn.__doc__ and "[B, T]" in fn.__doc__, name


# ----------------------------------------------------------------------------- data parallel

DP_NAMES = ("gae", "reinforce_plus_plus", "reinforce_plus_plus_baseline", "gpg")
# each rank holds whole groups; rank 0 has more zero scores than rank 1, so a local gpg alpha differs
DP_INDEX = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 4, 4, 4, 5])


def dp_batch():
    rewards, mask, values, baselines = ragged_batch(8, batch=12, length=8)
    rewards[1:4] = 0.0
    return rewards, mask, values, baselines


def dp_run(name, rewards, mask, values, group_index, dp_group=None):
    return get_advantage_estimator(name)(rewards, mask, values=values, group_index=group_index,
                                         gamma=0.9, lam=0.95, dp_group=dp_group)


def _dp_worker(rank: int, world_size: int, expected: dict) -> None:
    import torch.distributed as dist

    rewards, mask, values, _ = dp_batch()
    rows = slice(rank * 6, rank * 6 + 6)
    for name in DP_NAMES:
        adv, ret = dp_run(name, rewards[rows], mask[rows], values[rows], DP_INDEX[rows], dist.group.WORLD)
        close(adv, expected[name][0][rows])
        close(ret, expected[name][1][rows])


def test_dp_shards_equal_full_batch():
    rewards, mask, values, _ = dp_batch()
    expected = {name: dp_run(name, rewards, mask, values, DP_INDEX) for name in DP_NAMES}
    # without the group each half would differ: the statistics really are batch-wide
    for name in DP_NAMES:
        local, _ = dp_run(name, rewards[:6], mask[:6], values[:6], DP_INDEX[:6])
        assert not torch.allclose(local, expected[name][0][:6], atol=1e-3), name
    run_on_ranks(_dp_worker, 2, expected)


# ----------------------------------------------------------------------------- errors


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="unknown advantage estimator 'ppo'; valid names: gae, gpg, grpo, "
                                         "grpo_passk, opo, reinforce_plus_plus, reinforce_plus_plus_baseline, "
                                         "remax, rloo"):
        get_advantage_estimator("ppo")


@pytest.mark.parametrize("name", ["grpo", "rloo", "reinforce_plus_plus_baseline", "opo", "gpg", "grpo_passk"])
def test_group_estimators_need_group_index(name):
    with pytest.raises(ValueError, match=f"^{name} needs group_index: one int per response"):
        call(name)
    with pytest.raises(ValueError, match=rf"^{name}: group_index has shape \(3,\), expected \(4,\)"):
        call(name, group_index=torch.tensor([0, 0, 1]))


def test_missing_values_and_baselines():
    with pytest.raises(ValueError, match=r"^gae needs values: the critic's \[B, T\] value"):
        call("gae")
    with pytest.raises(ValueError, match=r"^gae: values has shape \(4, 2\), expected \(4, 3\)"):
        call("gae", values=torch.zeros(4, 2, dtype=F64))
    with pytest.raises(ValueError, match=r"^remax needs reward_baselines: the \[B\] reward"):
        call("remax")
    with pytest.raises(ValueError, match=r"^remax: reward_baselines has shape \(2,\), expected \(4,\)"):
        call("remax", reward_baselines=torch.zeros(2, dtype=F64))


def test_bad_mask_shape_and_passk_singleton():
    with pytest.raises(ValueError, match=r"^rloo: token_rewards \(4, 3\) and response_mask \(4, 2\) must"):
        call("rloo", mask=MASK[:, :2], group_index=GROUPS)
    with pytest.raises(ValueError, match="^grpo_passk needs at least 2 responses per group; group 7 has 1"):
        call("grpo_passk", group_index=torch.tensor([7, 4, 4, 4]))
