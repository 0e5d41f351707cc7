"""KL estimators, the in-reward KL penalty and the KL coefficient controllers."""

from __future__ import annotations

import math

import pytest
import torch

torch.set_num_threads(1)

from spmd_rl.algorithms.kl import (  # noqa: E402
    KL_KINDS,
    KL_PENALTIES,
    AdaptiveKLController,
    FixedKLController,
    apply_kl_penalty,
    build_kl_controller,
    kl_penalty,
)

ALL_KINDS = "kl, k1, abs, mse, k2, low_var_kl, k3, kl+, k1+, abs+, mse+, k2+, low_var_kl+, k3+"


def random_logprobs(seed: int, scale: float = 1.0):
    gen = torch.Generator().manual_seed(seed)
    lp = -torch.rand(6, 9, generator=gen, dtype=torch.float64) * 4
    ref = lp + torch.randn(6, 9, generator=gen, dtype=torch.float64) * scale
    return lp, ref


# ----------------------------------------------------------------------------- estimators


def test_estimators_hand_computed():
    # token 0: x = lp - ref = 0.5; token 1: x = -1
    lp = torch.tensor([[-1.0, -1.0]], dtype=torch.float64)
    ref = torch.tensor([[-1.5, 0.0]], dtype=torch.float64)
    expect = {
        "kl": [0.5, -1.0],
        "abs": [0.5, 1.0],
        "mse": [0.125, 0.5],
        # exp(-x) + x - 1
        "low_var_kl": [math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 1 - 1],
    }
    aliases = {"kl": "k1", "mse": "k2", "low_var_kl": "k3"}
    for kind, values in expect.items():
        for name in (kind, aliases.get(kind, kind), kind + "+"):
            out = kl_penalty(lp, ref, name)
            torch.testing.assert_close(out, torch.tensor([values], dtype=torch.float64), rtol=0, atol=1e-12)


def test_k3_clamps():
    lp = torch.tensor([[0.0, -30.0, 0.0]], dtype=torch.float64)
    ref = torch.tensor([[-30.0, 0.0, -12.0]], dtype=torch.float64)
    out = kl_penalty(lp, ref, "k3")
    # log(ref/pi) = -30 -> clamped to -20: e^-20 + 20 - 1 = 19.000000002 -> clamped to 10
    # log(ref/pi) = 30 -> clamped to 20: e^20 - 21 -> clamped to 10
    # log(ref/pi) = -12: e^-12 + 12 - 1 = 11 -> 10
    assert out.tolist() == [[10.0, 10.0, 10.0]]


def test_k3_is_non_negative_on_random_inputs():
    lp, ref = random_logprobs(seed=0, scale=5.0)
    out = kl_penalty(lp, ref, "low_var_kl")
    assert (out >= 0).all() and (out <= 10).all()
    assert (out == 10).any() and (out < 1e-3).any()  # both the clamp and near-zero values occur


@pytest.mark.parametrize("base", ["kl", "k1", "abs", "low_var_kl", "k3"])
def test_plus_suffix_has_base_value_and_k2_gradient(base):
    lp, ref = random_logprobs(seed=1)
    lp_plus = lp.clone().requires_grad_(True)
    ref_plus = ref.clone().requires_grad_(True)
    out = kl_penalty(lp_plus, ref_plus, base + "+")
    torch.testing.assert_close(out, kl_penalty(lp, ref, base), rtol=0, atol=0)
    out.sum().backward()
    # d/d lp of (lp - ref)^2 / 2 = lp - ref
    torch.testing.assert_close(lp_plus.grad, lp - ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(ref_plus.grad, ref - lp, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["mse+", "k2+"])
def test_k2_plus_is_k2(kind):
    lp, ref = random_logprobs(seed=2)
    lp_a = lp.clone().requires_grad_(True)
    lp_b = lp.clone().requires_grad_(True)
    a, b = kl_penalty(lp_a, ref, kind), kl_penalty(lp_b, ref, "k2")
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    a.sum().backward()
    b.sum().backward()
    torch.testing.assert_close(lp_a.grad, lp_b.grad, rtol=0, atol=0)


def test_k3_gradient_differs_from_k2_without_plus():
    lp, ref = random_logprobs(seed=3)
    lp_g = lp.clone().requires_grad_(True)
    kl_penalty(lp_g, ref, "k3").sum().backward()
    # d/d lp of exp(ref - lp) - (ref - lp) - 1 = 1 - exp(ref - lp)
    torch.testing.assert_close(lp_g.grad, 1 - torch.exp(ref - lp), rtol=1e-12, atol=1e-12)


def test_kinds_and_errors_list_valid_kinds():
    assert KL_PENALTIES == ("kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3")
    assert ", ".join(KL_KINDS) == ALL_KINDS
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError) as info:
        kl_penalty(x, x, "k4")
    assert str(info.value) == f"unknown KL penalty 'k4'; valid kinds: {ALL_KINDS}"
    with pytest.raises(ValueError) as info:
        kl_penalty(x, x, "full")
    assert str(info.value) == (
        f"KL penalty 'full' (exact KL over the vocabulary) is not supported; valid kinds: {ALL_KINDS}"
    )
    with pytest.raises(ValueError, match="not supported"):
        kl_penalty(x, x, "full+")
    with pytest.raises(ValueError, match="^unknown KL penalty 'k3\\+\\+'"):
        kl_penalty(x, x, "k3++")


# ----------------------------------------------------------------------------- in-reward penalty


def test_apply_kl_penalty_hand_computed():
    scores = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [2.0, 0.0, 0.0]], dtype=torch.float64)
    lp = torch.tensor([[-1.0, -2.0, -1.0], [-1.0, -1.0, -1.0], [-0.5, float("nan"), 0.0]], dtype=torch.float64)
    ref = torch.tensor([[-1.5, -1.0, -9.0], [-1.0, -1.0, -1.0], [-1.0, -1.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    rewards, mean_kl = apply_kl_penalty(scores, lp, ref, mask, kl_coef=0.1, kind="kl")
    # k1 on valid tokens: row 0 = [0.5, -1], row 2 = [0.5]; padding (and its NaN) gives 0
    expect = torch.tensor([[-0.05, 1.1, 0.0], [0.0, 0.0, 0.0], [1.95, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(rewards, expect, rtol=0, atol=1e-12)
    # per-row means: -0.25, 0 (empty row counts as 0, as verl), 0.5 -> mean over the 3 rows
    assert mean_kl.dim() == 0
    assert mean_kl.item() == pytest.approx((-0.25 + 0.0 + 0.5) / 3)


def test_apply_kl_penalty_uses_the_estimator():
    lp = torch.tensor([[-1.0, -1.0]], dtype=torch.float64)
    ref = torch.tensor([[-1.5, 0.0]], dtype=torch.float64)
    rewards, mean_kl = apply_kl_penalty(torch.zeros(1, 2), lp, ref, torch.ones(1, 2), kl_coef=2.0, kind="mse")
    torch.testing.assert_close(rewards, torch.tensor([[-0.25, -1.0]], dtype=torch.float64))
    assert mean_kl.item() == pytest.approx((0.125 + 0.5) / 2)


# ----------------------------------------------------------------------------- controllers


def test_fixed_controller_never_changes():
    ctrl = FixedKLController(0.05)
    ctrl.update(10.0, n_steps=100)
    assert ctrl.value == 0.05
    assert build_kl_controller("fixed", 0.05).value == 0.05


def test_adaptive_controller_two_updates():
    ctrl = AdaptiveKLController(init_kl_coef=0.1, target_kl=0.05, horizon=100)
    # error = clip(0.055 / 0.05 - 1, -0.2, 0.2) = 0.1 -> x (1 + 0.1 * 10 / 100) = x 1.01
    ctrl.update(0.055, n_steps=10)
    assert ctrl.value == pytest.approx(0.101, abs=1e-15)
    # error = clip(0.01 / 0.05 - 1 = -0.8) = -0.2 -> x (1 - 0.2 * 20 / 100) = x 0.96; a tensor KL is accepted
    ctrl.update(torch.tensor(0.01), n_steps=20)
    assert ctrl.value == pytest.approx(0.101 * 0.96, abs=1e-12)


def test_adaptive_controller_checkpoint_round_trip():
    ctrl = build_kl_controller("adaptive", 0.2, target_kl=0.1, horizon=50)
    assert isinstance(ctrl, AdaptiveKLController)
    ctrl.update(1.0, n_steps=5)  # error clipped to 0.2 -> x 1.02
    state = ctrl.state_dict()
    assert state == {"value": pytest.approx(0.204)}
    fresh = build_kl_controller("adaptive", 0.2, target_kl=0.1, horizon=50)
    fresh.load_state_dict(state)
    assert fresh.value == ctrl.value
    fixed = FixedKLController(0.3)
    fixed.load_state_dict({"value": 0.7})
    assert fixed.state_dict() == {"value": 0.7}


def test_controller_errors():
    with pytest.raises(ValueError) as info:
        build_kl_controller("pid", 0.1)
    assert str(info.value) == "unknown KL controller 'pid'; valid kinds: fixed, adaptive"
    with pytest.raises(ValueError, match="^adaptive KL controller: horizon must be > 0, got 0$"):
        build_kl_controller("adaptive", 0.1, target_kl=0.1, horizon=0)
    with pytest.raises(ValueError, match="target_kl must be > 0"):
        AdaptiveKLController(0.1, target_kl=0.0, horizon=10)
