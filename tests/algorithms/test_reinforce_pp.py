"""REINFORCE++ and REINFORCE++-baseline: learning on a toy reward, and the estimator as the algorithm wires it
(per-token k1 in the reward, returns-to-go whitened over every token of the rollout, written into the buffer)."""

import numpy as np
import pytest

from algorithms.reinforce_pp import REINFORCEPP
from lm_gym.models import tiny_causal_lm
from tests.learning import INITIAL_MAX, THRESHOLDS, run_toy
from tests.toys import toy_algo


@pytest.mark.parametrize("name", ["reinforce_pp", "reinforce_pp_baseline"])
@pytest.mark.learning
def test_reinforce_pp_raises_the_toy_reward(tiny, name):
    initial, rise, algo = run_toy(name, tiny)
    assert initial < INITIAL_MAX, f"the untrained model's first rollout scored {initial:.3f}"
    assert rise > THRESHOLDS[name], f"score rose by {rise:+.3f}, needed > {THRESHOLDS[name]}"
    keys = ["train/clip_ratio_low", "train/clip_ratio_high", "train/policy_loss", "rollout/entropy"]
    if algo.group_size > 1:
        keys.append("rollout/frac_zero_std_groups")
    else:  # a group of one is trivially constant: no such statistic
        assert "rollout/frac_zero_std_groups" not in algo.logger.history[-1]
    for key in keys:
        assert key in algo.logger.history[-1], key


def hand_reinforce_pp(token_rewards: list[np.ndarray], scores: np.ndarray, group_size: int | None) -> list:
    """Hu 2025, section 3: each token's return-to-go (gamma 1), minus its group's mean score for the baseline
    variant, whitened by the mean and (biased) std over every token of the rollout."""
    returns = [np.cumsum(r[::-1])[::-1] for r in token_rewards]
    if group_size is not None:
        means = scores.reshape(-1, group_size).mean(axis=1).repeat(group_size)
        returns = [ret - mean for ret, mean in zip(returns, means)]
    every = np.concatenate(returns)
    return [(ret - every.mean()) / np.sqrt(max(every.var(), 1e-8)) for ret in returns]


@pytest.mark.parametrize(
    "settings", [{}, {"kl_coef": 0.05}, {"baseline": True, "group_size": 4, "kl_coef": 0.05}]
)
def test_reinforce_pp_advantages_are_whitened_returns_to_go(tiny, settings):
    # another random model as the reference: every token's k1 reward is far from 0 from the first rollout on
    reference = tiny_causal_lm(seed=1)[0].requires_grad_(False) if settings.get("kl_coef") else None
    algo = toy_algo(REINFORCEPP, tiny, **settings, reference=reference)
    algo.collect_rollouts()
    rollout, buffer = algo.rollout, algo.buffer
    np.testing.assert_array_equal(rollout.columns, np.arange(8))
    token_rewards = [buffer.rewards[:length, c] for c, length in zip(rollout.columns, rollout.lengths)]
    if settings.get("kl_coef"):
        # per token: -beta k1, plus the score at the last token (rollout/kl: the mean of the texts' k1 sums)
        kl = algo.logger.values["rollout/kl"]
        # measured: 1.22 (G = 1) and 0.90 (G = 4) per text at seed 0, default kernels
        assert kl > 0.3 and all(np.all(r[:-1] != 0) for r in token_rewards)
        penalties = np.array([r.sum() for r in token_rewards]) - rollout.scores
        assert penalties.mean() == pytest.approx(-settings["kl_coef"] * kl, rel=1e-9, abs=1e-9)
    else:  # the score at each text's last token, nothing before
        assert all(np.all(r[:-1] == 0) and r[-1] == s for r, s in zip(token_rewards, rollout.scores))
    expected = hand_reinforce_pp(token_rewards, rollout.scores, algo.group_size if algo.baseline else None)
    advantages = algo.advantages(algo.group_batch()).numpy()
    assert advantages.shape == (8, rollout.lengths.max())
    for i, length in enumerate(rollout.lengths):
        # float32 against float64, after dividing by a std
        np.testing.assert_allclose(advantages[i, :length], expected[i], rtol=1e-4, atol=1e-4)
        assert np.all(advantages[i, length:] == 0)

    algo.train()
    for i, (column, length) in enumerate(zip(rollout.columns, rollout.lengths)):
        np.testing.assert_allclose(buffer.advantages[:length, column], expected[i], rtol=1e-4, atol=1e-4)
    algo.close()
