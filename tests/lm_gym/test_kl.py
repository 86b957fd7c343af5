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
    with pytest.raises(ValueError, match="must be 'k1', 'k2' or 'k3'; got 'k4'"):
        kl_estimate(np.zeros(2), np.zeros(2), "k4")  # type: ignore[arg-type]


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
    # KL 6.6 -> e = 6.6/6 - 1 = 0.1 (inside the clip); 256 texts -> beta * (1 + 0.1 * 256/10000)
    beta = 0.2 * (1 + 0.1 * 256 / 10_000)
    # measured: equal under 4 CPU kernel settings (docs/testing.md)
    assert ctl.update(6.6, 256) == pytest.approx(beta, rel=1e-12)
    # KL 3 -> e = -0.5, clipped to -0.2; 512 texts
    beta *= 1 - 0.2 * 512 / 10_000
    # measured: equal under 4 CPU kernel settings (docs/testing.md)
    assert ctl.update(3.0, n_samples=512) == pytest.approx(beta, rel=1e-12)
    # measured: equal under 4 CPU kernel settings (docs/testing.md)
    assert ctl.value == pytest.approx(beta, rel=1e-12)


def test_adaptive_controller_clips_large_kl_at_plus_twenty_percent() -> None:
    ctl = AdaptiveKLController(1.0, target=1.0, horizon=100)
    # measured: equal under 4 CPU kernel settings (docs/testing.md)
    assert ctl.update(50.0, 100) == pytest.approx(1.2)  # e = 49 -> 0.2; full horizon
    # measured: equal under 4 CPU kernel settings (docs/testing.md)
    assert ctl.update(1.0, 100) == pytest.approx(1.2)  # on target: no change


def test_adaptive_controller_gain_replaces_samples_over_horizon() -> None:
    ctl = AdaptiveKLController(0.1, target=2.0, horizon=10, gain=0.1)
    # e = 2.2/2 - 1 = 0.1; step = gain, whatever n_samples is
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


@pytest.mark.parametrize(("kl", "n_samples"), [(float("nan"), 10), (float("inf"), 10), (1.0, -5)])
def test_adaptive_update_rejects_non_finite_kl_and_negative_samples(kl: float, n_samples: int) -> None:
    ctl = AdaptiveKLController(0.2, target=6.0)
    with pytest.raises(ValueError):
        ctl.update(kl, n_samples)
    assert ctl.value == 0.2  # a rejected update leaves beta alone


def test_adaptive_load_state_dict_rejects_invalid_settings() -> None:
    ctl = AdaptiveKLController(0.2, target=6.0)
    with pytest.raises(ValueError, match="target"):
        ctl.load_state_dict({"value": 0.2, "target": -1.0, "horizon": 10, "gain": None})


# ---------------------------------------------------------------------------------------------------------
# k2, and which estimator gives which gradient (issue 14; the table of lm_gym/kl.py's docstring)
# ---------------------------------------------------------------------------------------------------------
def test_k2_is_half_the_squared_log_ratio() -> None:
    logp, ref = np.array(LOGP), np.array(REF_LOGP)
    # measured: equal (float64)
    np.testing.assert_allclose(kl_estimate(logp, ref, "k2"), [0.125, 0.125, 0.0, 4.5])
    k2 = kl_estimate(
        torch.tensor(LOGP, dtype=torch.float64), torch.tensor(REF_LOGP, dtype=torch.float64), "k2"
    )
    assert isinstance(k2, torch.Tensor) and k2.tolist() == [0.125, 0.125, 0.0, 4.5]
    assert kl_estimate(-1.0, -1.5, "k2") == 0.125


def _gradients(logits: torch.Tensor, ref_logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradients with respect to the policy's logits on a categorical, every expectation over ``a ~ pi`` an
    exact sum over the support: of KL(pi||ref) and KL(ref||pi), and of each estimator used as a per-token
    reward (REINFORCE: ``E_pi[f * grad log pi]``, ``f`` fixed) and as a loss (``E_pi[grad f]``, ``pi`` fixed)."""
    theta = logits.clone().requires_grad_(True)
    logp, ref = torch.log_softmax(theta, -1), torch.log_softmax(ref_logits, -1)  # (V,)
    pi = logp.exp()
    objectives = {
        "KL(pi||ref)": (pi * (logp - ref)).sum(),
        "KL(ref||pi)": (ref.exp() * (ref - logp)).sum(),
    }
    for estimator in ("k1", "k2", "k3"):
        f = kl_estimate(logp.detach(), ref, estimator)
        objectives[f"reward {estimator}"] = (pi.detach() * f * logp).sum()
        objectives[f"loss {estimator}"] = (pi.detach() * kl_estimate(logp, ref, estimator)).sum()
    return {
        name: torch.autograd.grad(value, theta, retain_graph=True)[0] for name, value in objectives.items()
    }


@pytest.mark.parametrize("seed", range(4))
def test_which_estimator_gives_which_gradient(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    logits, ref_logits = torch.randn(2, 8, generator=generator, dtype=torch.float64)
    g = _gradients(logits, ref_logits)
    forward, reverse = g["KL(pi||ref)"], g["KL(ref||pi)"]

    def close(a: torch.Tensor, b: torch.Tensor) -> None:
        # measured: |diff| <= 2.1e-16 under 4 CPU kernel settings (float64, exact sums over the support)
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)

    def far(a: torch.Tensor, b: torch.Tensor) -> bool:  # measured: >= 0.31 |grad KL(pi||ref)| apart
        return bool((a - b).norm() > 0.1 * forward.norm())

    # as a per-token reward: only k1 gives the KL's gradient
    close(g["reward k1"], forward)
    close(g["reward k3"], forward - reverse)
    assert all(far(g[f"reward {k}"], target) for k in ("k2", "k3") for target in (forward, reverse))
    # in a loss through log pi: k1 gives nothing, k2 the KL's gradient, k3 that of KL(pi_ref || pi)
    close(g["loss k1"], torch.zeros_like(forward))
    close(g["loss k2"], forward)
    close(g["loss k3"], reverse)
    assert far(forward, reverse)  # the two KLs' gradients differ here, so the rows above tell them apart


@pytest.mark.parametrize("distance", [1.0, 0.1, 0.01])
def test_k3_as_a_reward_loses_the_kl_gradient_near_the_reference(distance: float) -> None:
    """Near pi_ref, k3's REINFORCE gradient vanishes against the KL's (they differ at second order)."""
    generator = torch.Generator().manual_seed(0)
    ref_logits, direction = torch.randn(2, 8, generator=generator, dtype=torch.float64)
    g = _gradients(ref_logits + distance * direction / direction.norm(), ref_logits)
    ratio = g["reward k3"].norm() / g["KL(pi||ref)"].norm()
    # measured: ratio 0.14, 0.013, 0.0013 at distances 1, 0.1, 0.01
    assert ratio < 0.2 * distance, (
        f"|grad of k3 as a reward| / |grad KL| = {ratio:.3g} at distance {distance}"
    )
    # measured: |diff| <= 1.4e-16 under 4 CPU kernel settings (float64, exact sums over the support)
    torch.testing.assert_close(g["reward k1"], g["KL(pi||ref)"], atol=1e-12, rtol=0)
