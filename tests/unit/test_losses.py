"""Policy and value losses against hand-computed numbers and plain-Python references of verl's formulas.

The references loop over tokens in Python floats on purpose: they share no code (and no
vectorisation trick) with spmd_rl.algorithms.losses.
"""

from __future__ import annotations

import math

import pytest
import torch

torch.set_num_threads(1)

from spmd_rl.algorithms.losses import (  # noqa: E402
    AGG_MODES,
    POLICY_LOSSES,
    get_policy_loss,
    value_loss,
)

LOSS_NAMES = ("vanilla", "gspo", "gpg", "clip_cov", "kl_cov", "cispo")
SPLIT_INVARIANT = ("vanilla", "gspo", "gpg", "cispo")


# ----------------------------------------------------------------------------- inputs


def ragged_mask(batch: int, length: int, gen: torch.Generator, empty_rows: tuple[int, ...] = ()) -> torch.Tensor:
    """[B, T] float64 0/1 mask whose row i has a random length in [1, T] (0 for ``empty_rows``)."""
    lengths = torch.randint(1, length + 1, (batch,), generator=gen)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).to(torch.float64)
    for row in empty_rows:
        mask[row] = 0.0
    return mask


def loss_inputs(seed: int, batch: int = 8, length: int = 6):
    """float64 (logprobs, old, advantages, mask) with clipped and unclipped tokens and one empty row."""
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(batch, length, generator=gen, dtype=torch.float64) * 3
    logprobs = old + torch.randn(batch, length, generator=gen, dtype=torch.float64) * 0.4
    logprobs[0, 0] = old[0, 0] + 2.0  # ratio e^2: PPO clip and dual clip
    logprobs[1, 0] = old[1, 0] + 25.0  # log-ratio beyond the +-20 clamp
    logprobs[1, 1] = old[1, 1] - 25.0
    advantages = torch.randn(batch, length, generator=gen, dtype=torch.float64)
    advantages[0, 0] = advantages[1, 0] = -1.5
    mask = ragged_mask(batch, length, gen, empty_rows=(batch - 1,))
    mask[0, 0] = mask[1, :2] = 1.0
    return logprobs, old, advantages, mask


def seq_constant(advantages: torch.Tensor) -> torch.Tensor:
    """One advantage per row, as outcome-reward estimators produce (GSPO's setting)."""
    return advantages[:, :1].expand_as(advantages).clone()


# ----------------------------------------------------------------------------- references


def ref_aggregate(loss: list[list[float]], mask: list[list[float]], mode: str, scale_factor=None) -> float:
    """verl agg_loss with local denominators; empty rows are left out of the sequence count."""
    rows = [(sum(l * m for l, m in zip(lr, mr)), sum(mr)) for lr, mr in zip(loss, mask)]
    if mode == "token-mean":
        return sum(s for s, _ in rows) / sum(n for _, n in rows)
    valid = [(s, n) for s, n in rows if n > 0]
    if mode == "seq-mean-token-sum":
        return sum(s for s, _ in valid) / len(valid)
    if mode == "seq-mean-token-mean":
        return sum(s / (n + 1e-8) for s, n in valid) / len(valid)
    assert mode == "seq-mean-token-sum-norm"
    return sum(s for s, _ in valid) / len(valid) / (scale_factor or len(mask[0]))


def clamp(x: float, lo: float, hi: float) -> float:
    return min(max(x, lo), hi)


def ref_vanilla(lp, old, adv, lo, hi, c):
    """-> (token loss, PPO clip active, dual clip active, old - new)."""
    log_ratio = clamp(lp - old, -20.0, 20.0)
    ratio = math.exp(log_ratio)
    unclipped, clipped = -adv * ratio, -adv * clamp(ratio, 1 - lo, 1 + hi)
    ppo = max(unclipped, clipped)
    if adv < 0:
        return min(ppo, -adv * c), clipped > unclipped, ppo > -adv * c, -log_ratio
    return ppo, clipped > unclipped, False, -log_ratio


def ref_gspo_rows(lp_row, old_row, adv_row, mask_row, lo, hi):
    """GSPO losses of one row: every token uses the row's geometric-mean ratio."""
    n = sum(mask_row)
    seq_log_ratio = sum((l - o) * m for l, o, m in zip(lp_row, old_row, mask_row)) / max(n, 1)
    ratio = math.exp(min(seq_log_ratio, 10.0))
    out = []
    for a, l, o in zip(adv_row, lp_row, old_row):
        unclipped, clipped = -a * ratio, -a * clamp(ratio, 1 - lo, 1 + hi)
        out.append((max(unclipped, clipped), clipped > unclipped, -(l - o)))
    return out


def ref_cispo(lp, old, adv, lo, hi):
    log_ratio = clamp(lp - old, -20.0, 20.0)
    ratio = math.exp(log_ratio)
    weight = clamp(ratio, 1 - lo, 1 + hi)
    return -weight * adv * lp, ratio != weight, -log_ratio


def ref_value(v, old, ret, clip):
    clipped = old + clamp(v - old, -clip, clip)
    e1, e2 = (v - ret) ** 2, (clipped - ret) ** 2
    return max(e1, e2), e2 > e1


def masked_token_mean(values: list[list[float]], mask: list[list[float]]) -> float:
    pairs = [(v, m) for vr, mr in zip(values, mask) for v, m in zip(vr, mr)]
    return sum(v * m for v, m in pairs) / sum(m for _, m in pairs)


# ----------------------------------------------------------------------------- registry


def test_registry_holds_exactly_the_six_losses():
    assert sorted(POLICY_LOSSES) == sorted(LOSS_NAMES)


def test_unknown_policy_loss_lists_every_valid_name():
    with pytest.raises(ValueError) as info:
        get_policy_loss("grpo")
    assert str(info.value) == (
        "unknown policy loss 'grpo'; valid names: cispo, clip_cov, gpg, gspo, kl_cov, vanilla"
    )


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_metrics_are_detached_scalars_and_unknown_options_are_ignored(name):
    logprobs, old, adv, mask = loss_inputs(seed=0)
    lp = logprobs.clone().requires_grad_(True)
    loss, metrics = get_policy_loss(name)(lp, old, adv, mask, not_an_option=123, generator=torch.Generator())
    assert loss.dim() == 0 and loss.requires_grad and torch.isfinite(loss)
    assert {"pg_clipfrac", "pg_clipfrac_lower", "ppo_kl"} <= set(metrics)
    assert all(v.dim() == 0 and not v.requires_grad for v in metrics.values())


# ----------------------------------------------------------------------------- hand-computed


def test_vanilla_hand_computed():
    # token 0: A=1, r=1.5 -> clipped to 1.2 -> -1.2; token 1: A=-1, r=0.5 -> max(0.5, 0.8) = 0.8
    lp = torch.tensor([[math.log(1.5), math.log(0.5)]], dtype=torch.float64)
    old = torch.zeros(1, 2, dtype=torch.float64)
    adv = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    loss, m = get_policy_loss("vanilla")(lp, old, adv, torch.ones(1, 2))
    assert loss.item() == pytest.approx(-0.2)
    assert m["pg_clipfrac"].item() == pytest.approx(1.0)
    assert m["ppo_kl"].item() == pytest.approx((-math.log(1.5) - math.log(0.5)) / 2)


def test_gspo_hand_computed():
    # row 0: token log-ratios 0.1, 0.3 -> s = e^0.2 = 1.2214 > 1.2, A = 1 -> both tokens -1.2 (clipped)
    # row 1: one valid token, log-ratio -0.1 -> s = e^-0.1, A = -1 -> e^-0.1 (inside the trust region);
    # its padding has log-ratio 5 and must not enter s
    lp = torch.tensor([[0.1, 0.3], [-0.1, 5.0]], dtype=torch.float64)
    old = torch.zeros(2, 2, dtype=torch.float64)
    adv = torch.tensor([[1.0, 1.0], [-1.0, -1.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    loss, m = get_policy_loss("gspo")(lp, old, adv, mask, agg_mode="seq-mean-token-mean")
    assert loss.item() == pytest.approx((-1.2 + math.exp(-0.1)) / 2, abs=1e-7)
    loss_tm, _ = get_policy_loss("gspo")(lp, old, adv, mask, agg_mode="token-mean")
    assert loss_tm.item() == pytest.approx((-1.2 - 1.2 + math.exp(-0.1)) / 3, abs=1e-7)
    assert m["pg_clipfrac"].item() == pytest.approx(2 / 3)
    assert m["pg_clipfrac_lower"].item() == 0.0
    assert m["ppo_kl"].item() == pytest.approx((-0.1 - 0.3 + 0.1) / 3)


def test_gpg_hand_computed():
    lp = torch.tensor([[-1.0, -2.0, -7.0]], dtype=torch.float64)
    adv = torch.tensor([[1.0, 2.0, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)
    loss, m = get_policy_loss("gpg")(lp, torch.zeros_like(lp), adv, mask)
    assert loss.item() == pytest.approx((1.0 + 4.0) / 2)  # -lp * A, padding ignored
    assert all(v.item() == 0.0 for v in m.values())


def test_cispo_hand_computed():
    # token 0: r = 1.5 -> w = 1.2, A = 1, lp = -1 -> 1.2; token 1: r = 1, A = -1, lp = -2 -> -2
    lp = torch.tensor([[-1.0, -2.0]], dtype=torch.float64)
    old = torch.tensor([[-1.0 - math.log(1.5), -2.0]], dtype=torch.float64)
    adv = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    loss, m = get_policy_loss("cispo")(lp, old, adv, torch.ones(1, 2))
    assert loss.item() == pytest.approx((1.2 - 2.0) / 2)
    assert m["pg_clipfrac"].item() == pytest.approx(0.5)
    assert m["ppo_kl"].item() == pytest.approx(-math.log(1.5) / 2)
    assert m["pg_clipfrac_lower"].item() == 0.0
    # clip_low = 1.0 (the paper's setting) removes the lower bound: r = 0.1 keeps w = 0.1
    lp_low = torch.tensor([[math.log(0.1)]], dtype=torch.float64)
    loss_low, m_low = get_policy_loss("cispo")(lp_low, torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1),
                                               clip_low=1.0)
    assert loss_low.item() == pytest.approx(-0.1 * math.log(0.1))
    assert m_low["pg_clipfrac"].item() == 0.0


def test_value_loss_hand_computed():
    # token 0: v moved 1.0 from old 0.0, clipped to 0.5: errors (1-2)^2 = 1 and (0.5-2)^2 = 2.25 -> 2.25
    # token 1: v = old = 2.0, error (2-1)^2 = 1 both ways; token 2 is padding
    values = torch.tensor([[1.0, 2.0, 50.0]], dtype=torch.float64)
    old = torch.tensor([[0.0, 2.0, 0.0]], dtype=torch.float64)
    returns = torch.tensor([[2.0, 1.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)
    loss, m = value_loss(values, old, returns, mask, clip=0.5)
    assert loss.item() == pytest.approx(0.5 * (2.25 + 1.0) / 2)
    assert m["vf_clipfrac"].item() == pytest.approx(0.5)
    assert m["vpred_mean"].item() == pytest.approx(1.5)
    loss_sum, _ = value_loss(values, old, returns, mask, clip=0.5, agg_mode="seq-mean-token-sum-norm",
                             scale_factor=10)
    assert loss_sum.item() == pytest.approx(0.5 * 3.25 / 10)


def clip_cov_case():
    """Four valid tokens and one padded one, ratio 1 (no PPO clip).

    Valid A = [2, -2, 0.5, -0.5] (mean 0), logprobs = [-1, -5, -1, -1] (mean -2), so
    cov = A * (lp + 2) = [2, 6, 0.5, -0.5]. The padded token (A=100, lp=0) would have cov 200.
    """
    lp = torch.tensor([[-1.0, -5.0, -1.0], [-1.0, 0.0, 0.0]], dtype=torch.float64)
    adv = torch.tensor([[2.0, -2.0, 0.5], [-0.5, 100.0, 100.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    return lp, adv, mask


def test_clip_cov_zeroes_the_single_candidate():
    lp, adv, mask = clip_cov_case()
    # only (0, 0) has cov in (1, 5); clip_num = max(int(0.0002 * 4), 1) = 1
    loss, m = get_policy_loss("clip_cov")(lp, lp.clone(), adv, mask, generator=torch.Generator().manual_seed(0))
    # token losses -A = [-2, 2, -0.5, 0.5]; token (0, 0) zeroed -> (0 + 2 - 0.5 + 0.5) / 4
    assert loss.item() == pytest.approx(0.5)
    assert m["pg_clipfrac"].item() == pytest.approx(0.25)
    assert m["ppo_kl"].item() == 0.0
    # the zeroed token has no gradient, the others keep -A * r / 4
    lp_grad = lp.clone().requires_grad_(True)
    get_policy_loss("clip_cov")(lp_grad, lp.clone(), adv, mask)[0].backward()
    torch.testing.assert_close(lp_grad.grad, torch.tensor([[0.0, 0.5, -0.125], [0.125, 0.0, 0.0]],
                                                          dtype=torch.float64))


def test_clip_cov_picks_k_of_the_candidates_with_the_generator():
    lp, adv, mask = clip_cov_case()
    # bounds (0.1, 10): candidates in row-major order are (0,0) cov 2, (0,1) cov 6, (0,2) cov 0.5;
    # clip_cov_ratio 0.5 -> clip_num = 2 of the 3, chosen by randperm(3, generator)
    opts = dict(clip_cov_ratio=0.5, clip_cov_lb=0.1, clip_cov_ub=10.0)
    candidates = [(0, 0), (0, 1), (0, 2)]
    token_loss = {(0, 0): -2.0, (0, 1): 2.0, (0, 2): -0.5, (1, 0): 0.5}
    for seed in range(4):
        perm = torch.randperm(3, generator=torch.Generator().manual_seed(seed))[:2].tolist()
        picked = {candidates[i] for i in perm}
        loss, m = get_policy_loss("clip_cov")(lp, lp.clone(), adv, mask,
                                              generator=torch.Generator().manual_seed(seed), **opts)
        expect = sum(v for k, v in token_loss.items() if k not in picked) / 4
        assert loss.item() == pytest.approx(expect)
        assert m["pg_clipfrac"].item() == pytest.approx(0.5)


def test_clip_cov_skips_tokens_already_clipped_by_ppo():
    lp, adv, mask = clip_cov_case()
    old = lp.clone()
    old[0, 0] = lp[0, 0] - 1.0  # r = e > 1.2 with A = 2 > 0: PPO clip active, not a candidate any more
    loss, m = get_policy_loss("clip_cov")(lp, old, adv, mask)
    assert m["pg_clipfrac"].item() == 0.0  # no candidate left
    assert loss.item() == pytest.approx((-2.0 * 1.2 + 2.0 - 0.5 + 0.5) / 4)


def test_kl_cov_adds_the_kl_term_to_the_top_covariance_tokens():
    lp, adv, mask = clip_cov_case()
    old = lp.clone()
    old[0, 1] = lp[0, 1] - 0.3  # the top-cov token (cov 6) gets log r = 0.3
    old[0, 0] = lp[0, 0] + 0.2  # second (cov 2): log r = -0.2
    r1, r0 = math.exp(0.3), math.exp(-0.2)
    # k = max(1, int(4 * 0.0002)) = 1: only (0, 1) changes, by ppo_kl_coef * |log r| = 2 * 0.3
    loss, m = get_policy_loss("kl_cov")(lp, old, adv, mask, ppo_kl_coef=2.0)
    base = (-2.0 * r0) + (2.0 * r1) - 0.5 + 0.5  # unclipped -A r everywhere (no PPO clip)
    assert loss.item() == pytest.approx((base + 2.0 * 0.3) / 4)
    assert m["ppo_kl"].item() == pytest.approx((0.2 + 0.3) / 4)  # mean |log r|
    assert m["pg_clipfrac"].item() == 0.0 and m["pg_clipfrac_lower"].item() == 0.0
    # k = int(4 * 0.5) = 2: (0, 1) and (0, 0), never the padded token of cov 200
    loss2, _ = get_policy_loss("kl_cov")(lp, old, adv, mask, kl_cov_ratio=0.5, ppo_kl_coef=2.0)
    assert loss2.item() == pytest.approx((base + 2.0 * 0.3 + 2.0 * 0.2) / 4)


@pytest.mark.parametrize("name,option", [("clip_cov", "clip_cov_ratio"), ("kl_cov", "kl_cov_ratio")])
def test_cov_ratios_must_be_positive(name, option):
    lp, adv, mask = clip_cov_case()
    with pytest.raises(ValueError, match=f"^{option} must be > 0, got 0.0$"):
        get_policy_loss(name)(lp, lp, adv, mask, **{option: 0.0})


# ----------------------------------------------------------------------------- references


@pytest.mark.parametrize("mode", AGG_MODES)
def test_vanilla_matches_reference(mode):
    logprobs, old, adv, mask = loss_inputs(seed=1)
    loss, m = get_policy_loss("vanilla")(logprobs, old, adv, mask, clip_low=0.2, clip_high=0.28, agg_mode=mode)
    B, T = mask.shape
    tok = [[ref_vanilla(logprobs[i, j].item(), old[i, j].item(), adv[i, j].item(), 0.2, 0.28, 3.0)
            for j in range(T)] for i in range(B)]
    mk = mask.tolist()
    assert loss.item() == pytest.approx(ref_aggregate([[t[0] for t in r] for r in tok], mk, mode), abs=1e-10)
    for k, name in ((1, "pg_clipfrac"), (2, "pg_clipfrac_lower"), (3, "ppo_kl")):
        expect = masked_token_mean([[float(t[k]) for t in r] for r in tok], mk)
        assert m[name].item() == pytest.approx(expect, abs=1e-7)


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("constant_adv", [False, True])
def test_gspo_matches_reference(mode, constant_adv):
    logprobs, old, adv, mask = loss_inputs(seed=2)
    logprobs[1, 0], logprobs[1, 1] = old[1, 0] + 0.5, old[1, 1] + 80.0  # row 1: seq log-ratio > 10 -> clamp
    mask[1, :] = 1.0
    adv = seq_constant(adv) if constant_adv else adv
    loss, m = get_policy_loss("gspo")(logprobs, old, adv, mask, clip_low=0.2, clip_high=0.28, agg_mode=mode)
    mk = mask.tolist()
    tok = [ref_gspo_rows(logprobs[i].tolist(), old[i].tolist(), adv[i].tolist(), mk[i], 0.2, 0.28)
           for i in range(mask.shape[0])]
    assert loss.item() == pytest.approx(ref_aggregate([[t[0] for t in r] for r in tok], mk, mode), abs=1e-10)
    assert m["pg_clipfrac"].item() == pytest.approx(masked_token_mean([[float(t[1]) for t in r] for r in tok], mk))
    assert m["ppo_kl"].item() == pytest.approx(masked_token_mean([[t[2] for t in r] for r in tok], mk), abs=1e-7)
    assert m["pg_clipfrac_lower"].item() == 0.0


@pytest.mark.parametrize("mode", AGG_MODES)
def test_gpg_matches_reference(mode):
    logprobs, old, adv, mask = loss_inputs(seed=3)
    loss, _ = get_policy_loss("gpg")(logprobs, old, adv, mask, agg_mode=mode)
    ref = [[-l * a for l, a in zip(lr, ar)] for lr, ar in zip(logprobs.tolist(), adv.tolist())]
    assert loss.item() == pytest.approx(ref_aggregate(ref, mask.tolist(), mode), abs=1e-10)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_cispo_matches_reference(mode):
    logprobs, old, adv, mask = loss_inputs(seed=4)
    loss, m = get_policy_loss("cispo")(logprobs, old, adv, mask, clip_low=1.0, clip_high=0.28, agg_mode=mode)
    B, T = mask.shape
    tok = [[ref_cispo(logprobs[i, j].item(), old[i, j].item(), adv[i, j].item(), 1.0, 0.28) for j in range(T)]
           for i in range(B)]
    mk = mask.tolist()
    assert loss.item() == pytest.approx(ref_aggregate([[t[0] for t in r] for r in tok], mk, mode), abs=1e-10)
    clipfrac = masked_token_mean([[float(t[1]) for t in r] for r in tok], mk)
    assert 0 < clipfrac < 1
    assert m["pg_clipfrac"].item() == pytest.approx(clipfrac, abs=1e-7)
    assert m["ppo_kl"].item() == pytest.approx(masked_token_mean([[t[2] for t in r] for r in tok], mk), abs=1e-7)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_value_loss_matches_reference(mode):
    gen = torch.Generator().manual_seed(5)
    old = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    values = old + torch.randn(7, 5, generator=gen, dtype=torch.float64)
    returns = values + torch.randn(7, 5, generator=gen, dtype=torch.float64)  # near v: the clip often costs
    mask = ragged_mask(7, 5, gen, empty_rows=(3,))
    loss, m = value_loss(values, old, returns, mask, clip=0.5, agg_mode=mode)
    tok = [[ref_value(v, o, r, 0.5) for v, o, r in zip(vr, orow, rr)]
           for vr, orow, rr in zip(values.tolist(), old.tolist(), returns.tolist())]
    mk = mask.tolist()
    assert loss.item() == pytest.approx(0.5 * ref_aggregate([[t[0] for t in r] for r in tok], mk, mode), abs=1e-10)
    clipfrac = masked_token_mean([[float(t[1]) for t in r] for r in tok], mk)
    assert 0 < clipfrac < 1
    assert m["vf_clipfrac"].item() == pytest.approx(clipfrac, abs=1e-7)
    assert m["vpred_mean"].item() == pytest.approx(masked_token_mean(values.tolist(), mk), abs=1e-7)


# ----------------------------------------------------------------------------- gradients


def test_cispo_gradient_is_clipped_weight_times_advantage():
    logprobs, old, adv, mask = loss_inputs(seed=6)
    lp = logprobs.clone().requires_grad_(True)
    loss, _ = get_policy_loss("cispo")(lp, old, adv, mask, clip_low=0.2, clip_high=0.28)
    loss.backward()
    weight = torch.exp((logprobs - old).clamp(-20, 20)).clamp(0.8, 1.28)
    torch.testing.assert_close(lp.grad, -weight * adv * mask / mask.sum(), rtol=0, atol=1e-12)
    assert (lp.grad[mask.bool()] != 0).all()  # unlike PPO, clipped tokens keep a gradient


@pytest.mark.parametrize("constant_adv", [True, False])
def test_gspo_gradient_matches_sequence_formula(constant_adv):
    """verl's token-level GSPO equals the paper's sequence objective (Eq. 5) for one advantage per row.

    For token-varying advantages the gradient is still -A_t * s_i / (G * |y_i|) on unclipped tokens.
    """
    logprobs, old, adv, mask = loss_inputs(seed=7)
    logprobs = old + (logprobs - old).clamp(-0.5, 0.5)  # keep s_i moderate: some rows clipped, some not
    adv = seq_constant(adv) if constant_adv else adv
    lp = logprobs.clone().requires_grad_(True)
    loss, _ = get_policy_loss("gspo")(lp, old, adv, mask, clip_low=0.05, clip_high=0.05, agg_mode="seq-mean-token-mean")
    loss.backward()

    lengths = mask.sum(-1)
    rows = lengths > 0
    s = torch.exp(((logprobs - old) * mask).sum(-1) / lengths.clamp(min=1))  # [B]
    clipped = (-adv * s[:, None].clamp(0.95, 1.05)) > (-adv * s[:, None])
    assert clipped[rows].any() and (~clipped[mask.bool()]).any()
    expect = torch.where(clipped, 0.0, -adv * s[:, None]) * mask / (lengths.clamp(min=1)[:, None] * rows.sum())
    # rtol: seq-mean-token-mean divides by (|y_i| + 1e-8), as verl
    torch.testing.assert_close(lp.grad, expect, rtol=1e-7, atol=1e-12)

    if constant_adv:
        seq_lp = logprobs.clone().requires_grad_(True)
        s_seq = torch.exp(((seq_lp - old) * mask).sum(-1) / lengths.clamp(min=1))
        a = adv[:, 0]
        seq_loss = torch.maximum(-a * s_seq, -a * s_seq.clamp(0.95, 1.05))[rows].mean()
        seq_loss.backward()
        assert loss.item() == pytest.approx(seq_loss.item(), abs=1e-7)  # token mean of a row-constant = its value
        torch.testing.assert_close(lp.grad, seq_lp.grad, rtol=1e-7, atol=1e-12)


# ----------------------------------------------------------------------------- properties


def test_ppo_loss_is_minus_advantage_times_ratio_when_nothing_is_clipped():
    gen = torch.Generator().manual_seed(8)
    old = -torch.rand(6, 5, generator=gen, dtype=torch.float64) * 3
    logprobs = old + (torch.rand(6, 5, generator=gen, dtype=torch.float64) - 0.5) * 0.3  # |log r| < 0.15
    adv = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    mask = ragged_mask(6, 5, gen)
    loss, m = get_policy_loss("vanilla")(logprobs, old, adv, mask)
    ratio = torch.exp(logprobs - old)
    assert loss.item() == pytest.approx(((-adv * ratio * mask).sum() / mask.sum()).item(), abs=1e-12)
    assert m["pg_clipfrac"].item() == 0.0 and m["pg_clipfrac_lower"].item() == 0.0


def test_dual_clip_bounds_negative_advantage_loss():
    gen = torch.Generator().manual_seed(9)
    log_ratio = torch.randn(200, generator=gen, dtype=torch.float64) * 2
    adv = -torch.rand(200, generator=gen, dtype=torch.float64) * 3  # all negative
    bound_hits = 0
    for lr, a in zip(log_ratio.tolist(), adv.tolist()):
        one = torch.ones(1, 1, dtype=torch.float64)
        loss, m = get_policy_loss("vanilla")(one * lr, one * 0, one * a, one, clip_c=3.0)
        assert loss.item() <= -a * 3.0 + 1e-12
        bound_hits += m["pg_clipfrac_lower"].item() > 0.5  # 1 / (1 + 1e-8) when active
    assert bound_hits > 0  # the bound is active on some tokens (ratio > 3)


# ----------------------------------------------------------------------------- micro-batches


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("name", SPLIT_INVARIANT)
def test_two_micro_batches_sum_to_full_batch(name, mode):
    logprobs, old, adv, mask = loss_inputs(seed=10, batch=9, length=7)
    T = mask.shape[1]
    loss_fn = get_policy_loss(name)
    opts = dict(clip_low=0.2, clip_high=0.28, agg_mode=mode, scale_factor=T)

    full_lp = logprobs.clone().requires_grad_(True)
    full, _ = loss_fn(full_lp, old, adv, mask, **opts)
    full.backward()

    counts = {"global_tokens": int(mask.sum()), "global_seqs": int((mask.sum(-1) > 0).sum())}
    split_lp = logprobs.clone().requires_grad_(True)
    total = 0.0
    for rows in (slice(0, 4), slice(4, 9)):
        part, _ = loss_fn(split_lp[rows], old[rows], adv[rows], mask[rows], **opts, **counts)
        part.backward()
        total += part.item()
    assert total == pytest.approx(full.item(), abs=1e-10)
    torch.testing.assert_close(split_lp.grad, full_lp.grad, rtol=0, atol=1e-12)
    assert full_lp.grad.abs().sum() > 0


@pytest.mark.parametrize("mode", AGG_MODES)
def test_value_loss_micro_batches_sum_to_full_batch(mode):
    gen = torch.Generator().manual_seed(11)
    old = torch.randn(9, 6, generator=gen, dtype=torch.float64)
    values = old + torch.randn(9, 6, generator=gen, dtype=torch.float64)
    returns = torch.randn(9, 6, generator=gen, dtype=torch.float64)
    mask = ragged_mask(9, 6, gen, empty_rows=(2,))
    counts = {"global_tokens": int(mask.sum()), "global_seqs": int((mask.sum(-1) > 0).sum())}

    full_v = values.clone().requires_grad_(True)
    full, _ = value_loss(full_v, old, returns, mask, agg_mode=mode, scale_factor=6)
    full.backward()
    split_v = values.clone().requires_grad_(True)
    total = 0.0
    for rows in (slice(0, 5), slice(5, 9)):
        part, _ = value_loss(split_v[rows], old[rows], returns[rows], mask[rows], agg_mode=mode, scale_factor=6,
                             **counts)
        part.backward()
        total += part.item()
    assert total == pytest.approx(full.item(), abs=1e-10)
    torch.testing.assert_close(split_v.grad, full_v.grad, rtol=0, atol=1e-12)
