"""RLOO: learning on a toy reward, and the leave-one-out estimator as the algorithm wires it (the KL in each
text's reward, the baseline the mean of the other texts of its prompt, written into the buffer)."""

import numpy as np
import pytest

from algorithms.rloo import RLOO
from lm_gym.models import tiny_causal_lm
from tests.learning import INITIAL_MAX, THRESHOLDS, run_toy
from tests.toys import toy_algo


@pytest.mark.learning
def test_rloo_raises_the_toy_reward(tiny):
    initial, rise, algo = run_toy("rloo", tiny)
    assert initial < INITIAL_MAX, f"the untrained model's first rollout scored {initial:.3f}"
    assert rise > THRESHOLDS["rloo"], f"score rose by {rise:+.3f}, needed > {THRESHOLDS['rloo']}"
    for key in (
        "train/clip_ratio_low",
        "train/clip_ratio_high",
        "rollout/frac_zero_std_groups",
        "train/policy_loss",
        "rollout/entropy",
    ):
        assert key in algo.logger.history[-1], key


def hand_rloo(rewards: np.ndarray, group_size: int) -> np.ndarray:
    """Ahmadian et al. 2024, section 3: each text's reward minus the mean of the other texts' of its prompt."""
    out = np.empty_like(rewards)
    for first in range(0, len(rewards), group_size):
        group = rewards[first : first + group_size]
        for i, r in enumerate(group):
            out[first + i] = r - np.delete(group, i).mean()
    return out


@pytest.mark.parametrize("group_size", [2, 4])
@pytest.mark.parametrize("kl_coef", [0.0, 0.05])
def test_rloo_advantages_are_leave_one_out_with_the_kl_in_the_reward(tiny, group_size, kl_coef):
    # another random model as the reference: the KL is large from the first rollout on
    reference = tiny_causal_lm(seed=1)[0].requires_grad_(False) if kl_coef else None
    algo = toy_algo(RLOO, tiny, group_size=group_size, kl_coef=kl_coef, reference=reference)
    algo.collect_rollouts()
    rollout, buffer = algo.rollout, algo.buffer
    np.testing.assert_array_equal(rollout.columns, np.arange(8))
    rewards = np.array(
        [buffer.rewards[:length, c].sum() for c, length in zip(rollout.columns, rollout.lengths)]
    )
    if kl_coef:
        # each text's reward is its score minus beta times its summed k1 (rollout/kl: the mean of those sums)
        kl = algo.logger.values["rollout/kl"]
        # measured: 0.90 (G = 4) and 1.07 (G = 2) per text at seed 0, default kernels
        assert kl > 0.3, kl
        assert rewards.mean() == pytest.approx(rollout.scores.mean() - kl_coef * kl, rel=1e-9, abs=1e-9)
    else:
        np.testing.assert_array_equal(rewards, rollout.scores)
    assert np.ptp(rewards) > 0
    expected = hand_rloo(rewards, group_size)
    advantages = algo.advantages(algo.group_batch()).numpy()
    assert advantages.shape == (8,)
    np.testing.assert_allclose(advantages, expected, rtol=1e-5, atol=1e-5)  # float32 against float64

    algo.train()
    for i, (column, length) in enumerate(zip(rollout.columns, rollout.lengths)):
        np.testing.assert_allclose(buffer.advantages[:length, column], expected[i], rtol=1e-5, atol=1e-5)
    algo.close()
