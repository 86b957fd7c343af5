"""Tests of lm_gym.kl: the per-token KL estimators and the KL-coefficient controllers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lm_gym.kl import AdaptiveKLController, FixedKLController, kl_estimate

LOGP = [-1.0, -2.5, -0.1, -4.0]
REF_LOGP = [-1.5, -2.0, -0.1, -1.0]


def _k3_by_hand(logp: float, ref_logp: float) -> float:
    ratio = ref_logp - logp
    return math.exp(ratio) - 1.0 - ratio


# ---------------------------------------------------------------------------------------------------------
# kl_estimate
# ---------------------------------------------------------------------------------------------------------
def test_k1_is_logp_minus_ref_logp_on_floats() -> None:
    # measured: equal under 4 CPU kernel settings (docs/testing.md)
    assert kl_estimate(-1.0, -1.5, "k1") == pytest.approx(0.5)
    # measured: equal under 4 CPU kernel settings (docs/testing.md)
    assert kl_estimate(-2.5, -2.0) == pytest.approx(-0.5)  # k1 is the default and may be negative


def test_k3_matches_hand_formula_on_floats() -> None:
    for lp, ref in zip(LOGP, REF_LOGP, strict=True):
        # measured: equal under 4 CPU kernel settings (docs/testing.md)
        assert float(kl_estimate(lp, ref, "k3")) == pytest.approx(_k3_by_hand(lp, ref), rel=1e-12)


def test_k1_and_k3_on_numpy_arrays() -> None:
    logp, ref = np.array(LOGP), np.array(REF_LOGP)
    k1 = kl_estimate(logp, ref, "k1")
    k3 = kl_estimate(logp, ref, "k3")
    assert isinstance(k3, np.ndarray)
    # measured: equal under 4 CPU kernel settings (docs/testing.md)
    np.testing.assert_allclose(k1, [0.5, -0.5, 0.0, -3.0])
    # measured: |diff| <= 3.4e-08 (relative 4.7e-08) under 4 CPU kernel settings (docs/testing.md)
    np.testing.assert_allclose(k3, [_k3_by_hand(a, b) for a, b in zip(LOGP, REF_LOGP, strict=True)])


def test_k1_and_k3_on_tensors_keep_type_and_values() -> None:
    logp, ref = torch.tensor(LOGP, dtype=torch.float64), torch.tensor(REF_LOGP, dtype=torch.float64)
    k1 = kl_estimate(logp, ref, "k1")
    k3 = kl_estimate(logp, ref, "k3")
    assert isinstance(k3, torch.Tensor) and k3.dtype == torch.float64
    # measured: equal under 4 CPU kernel settings (docs/testing.md)
    torch.testing.assert_close(k1, torch.tensor([0.5, -0.5, 0.0, -3.0], dtype=torch.float64))
    expected = [_k3_by_hand(a, b) for a, b in zip(LOGP, REF_LOGP, strict=True)]
    # measured: equal under 4 CPU kernel settings (docs/testing.md)
    torch.testing.assert_close(k3, torch.tensor(expected, dtype=torch.float64))


def test_k3_is_zero_when_policies_agree() -> None:
    assert float(kl_estimate(-3.2, -3.2, "k3")) == 0.0


def test_k3_is_never_negative_on_random_inputs() -> None:
    rng = np.random.default_rng(0)
    logp = -rng.exponential(3.0, size=10_000)
    ref = -rng.exponential(3.0, size=10_000)
    assert (kl_estimate(logp, ref, "k3") >= 0).all()
    assert (kl_estimate(torch.from_numpy(logp), torch.from_numpy(ref), "k3") >= 0).all()
    assert (kl_estimate(logp, ref, "k1") < 0).any()  # the contrast: k1 does go negative


def test_k1_and_k3_are_unbiased_for_the_true_kl() -> None:
    rng = np.random.default_rng(1)
    p, q = np.array([0.7, 0.2, 0.1]), np.array([0.4, 0.4, 0.2])
    true_kl = float(np.sum(p * np.log(p / q)))
    tokens = rng.choice(3, size=200_000, p=p)  # sampled from the policy, as the estimators assume
    logp, ref = np.log(p[tokens]), np.log(q[tokens])
    # measured: |diff| <= 1.3e-04 (relative 7.2e-04) under 4 CPU kernel settings (docs/testing.md)
    assert kl_estimate(logp, ref, "k1").mean() == pytest.approx(true_kl, abs=5e-3)
    # measured: |diff| <= 1.8e-05 (relative 1.0e-04) under 4 CPU kernel settings (docs/testing.md)
    assert kl_estimate(logp, ref, "k3").mean() == pytest.approx(true_kl, abs=5e-3)


def test_unknown_estimator_raises_value_error() -> None:
    with pytest.raises(ValueError, match="k2"):
        kl_estimate(np.zeros(2), np.zeros(2), "k2")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------
# FixedKLController
# ---------------------------------------------------------------------------------------------------------
def test_fixed_controller_never_changes() -> None:
    ctl = FixedKLController(0.05)
    for kl, n in [(0.0, 1), (100.0, 10_000), (-3.0, 7), (1e-9, 0)]:
        assert ctl.update(kl, n) == 0.05
    assert ctl.value == 0.05


def test_fixed_controller_state_round_trip() -> None:
    ctl = FixedKLController(0.3)
    other = FixedKLController(0.0)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.3


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf")])
def test_fixed_controller_rejects_bad_coefficient(bad: float) -> None:
    with pytest.raises(ValueError, match="kl_coef"):
        FixedKLController(bad)


def test_zero_coefficient_is_allowed() -> None:
    assert FixedKLController(0.0).value == 0.0


# ---------------------------------------------------------------------------------------------------------
# AdaptiveKLController
# ---------------------------------------------------------------------------------------------------------
def test_adaptive_controller_follows_ziegler_formula() -> None:
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10_000)
    # KL 6.6 -> e = 6.6/6 - 1 = 0.1 (inside the clip); 256 steps -> beta * (1 + 0.1 * 256/10000)
    beta = 0.2 * (1 + 0.1 * 256 / 10_000)
    # measured: equal under 4 CPU kernel settings (docs/testing.md)
    assert ctl.update(6.6, 256) == pytest.approx(beta, rel=1e-12)
    # KL 3 -> e = -0.5, clipped to -0.2; 512 steps
    beta *= 1 - 0.2 * 512 / 10_000
    # measured: equal under 4 CPU kernel settings (docs/testing.md)
    assert ctl.update(3.0, 512) == pytest.approx(beta, rel=1e-12)
    # measured: equal under 4 CPU kernel settings (docs/testing.md)
    assert ctl.value == pytest.approx(beta, rel=1e-12)


def test_adaptive_controller_clips_large_kl_at_plus_twenty_percent() -> None:
    ctl = AdaptiveKLController(1.0, target=1.0, horizon=100)
    # measured: equal under 4 CPU kernel settings (docs/testing.md)
    assert ctl.update(50.0, 100) == pytest.approx(1.2)  # e = 49 -> 0.2; full horizon
    # measured: equal under 4 CPU kernel settings (docs/testing.md)
    assert ctl.update(1.0, 100) == pytest.approx(1.2)  # on target: no change


def test_adaptive_controller_gain_replaces_steps_over_horizon() -> None:
    ctl = AdaptiveKLController(0.1, target=2.0, horizon=10, gain=0.1)
    # e = 2.2/2 - 1 = 0.1; step = gain, whatever n_steps is
    # measured: equal under 4 CPU kernel settings (docs/testing.md)
    assert ctl.update(2.2, 1_000_000) == pytest.approx(0.1 * (1 + 0.1 * 0.1), rel=1e-12)
    # e = 0/2 - 1 = -1 -> clipped to -0.2
    # measured: equal under 4 CPU kernel settings (docs/testing.md)
    assert ctl.update(0.0, 1) == pytest.approx(0.1 * 1.01 * (1 - 0.2 * 0.1), rel=1e-12)


def test_adaptive_state_dict_restores_settings_and_value() -> None:
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=500, gain=None)
    ctl.update(9.0, 100)
    restored = AdaptiveKLController(1.0, target=1.0, horizon=1, gain=0.5)
    restored.load_state_dict(ctl.state_dict())
    assert (restored.value, restored.target, restored.horizon, restored.gain) == (
        ctl.value,
        6.0,
        500,
        None,
    )
    assert restored.update(4.0, 50) == ctl.update(4.0, 50)  # resumed runs steer identically


def test_adaptive_state_dict_keeps_gain() -> None:
    ctl = AdaptiveKLController(0.2, target=6.0, gain=0.1)
    restored = AdaptiveKLController(0.2, target=6.0)
    restored.load_state_dict(ctl.state_dict())
    assert restored.gain == 0.1


def test_adaptive_load_of_value_only_state_keeps_settings() -> None:
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=500)
    ctl.load_state_dict({"value": 0.7})
    assert (ctl.value, ctl.target, ctl.horizon, ctl.gain) == (0.7, 6.0, 500, None)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kl_coef": -1.0, "target": 6.0},
        {"kl_coef": 0.2, "target": 0.0},
        {"kl_coef": 0.2, "target": -6.0},
        {"kl_coef": 0.2, "target": float("nan")},
        {"kl_coef": 0.2, "target": 6.0, "horizon": 0},
        {"kl_coef": 0.2, "target": 6.0, "gain": -0.1},
        {"kl_coef": 0.2, "target": 6.0, "gain": 0.0},
    ],
)
def test_adaptive_controller_rejects_invalid_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        AdaptiveKLController(**kwargs)


@pytest.mark.parametrize(("kl", "n_steps"), [(float("nan"), 10), (float("inf"), 10), (1.0, -5)])
def test_adaptive_update_rejects_non_finite_kl_and_negative_steps(kl: float, n_steps: int) -> None:
    ctl = AdaptiveKLController(0.2, target=6.0)
    with pytest.raises(ValueError):
        ctl.update(kl, n_steps)
    assert ctl.value == 0.2  # a rejected update leaves beta alone


def test_adaptive_load_state_dict_rejects_invalid_settings() -> None:
    ctl = AdaptiveKLController(0.2, target=6.0)
    with pytest.raises(ValueError, match="target"):
        ctl.load_state_dict({"value": 0.2, "target": -1.0, "horizon": 10, "gain": None})
