"""GRPO and its variants (DAPO / Dr. GRPO, GSPO): learning on a toy reward, and the estimator as the algorithm
wires it (each text's reward standardised within its group, written into the buffer at the text's steps)."""

import numpy as np
import pytest

from algorithms.grpo import GRPO
from tests.learning import INITIAL_MAX, THRESHOLDS, run_toy
from tests.toys import toy_algo

CLIP_KEYS = ("train/clip_ratio_low", "train/clip_ratio_high", "rollout/frac_zero_std_groups")


def check_learning(name, tiny):
    initial, rise, algo = run_toy(name, tiny)
    assert initial < INITIAL_MAX, f"the untrained model's first rollout scored {initial:.3f}"
    assert rise > THRESHOLDS[name], f"score rose by {rise:+.3f}, needed > {THRESHOLDS[name]}"
    for key in (*CLIP_KEYS, "train/policy_loss", "train/approx_kl", "rollout/entropy"):
        assert key in algo.logger.history[-1], key
    assert "rollout/kl" not in algo.logger.history[-1]  # kl_coef 0: no reference at all
    return algo


@pytest.mark.learning
def test_grpo_raises_the_toy_reward(tiny):
    algo = check_learning("grpo", tiny)
    # one on-policy step per rollout: the ratio is 1 up to rounding, never clipped
    # measured: 0 at every iteration under 4 CPU kernel settings (docs/testing.md)
    assert all(h["train/clip_ratio_low"] == h["train/clip_ratio_high"] == 0 for h in algo.logger.history)


@pytest.mark.learning
def test_grpo_dapo_raises_the_toy_reward(tiny):
    algo = check_learning("grpo_dapo", tiny)
    for key in ("rollout/sampling_rounds", "rollout/sampling_shortfall"):
        assert key in algo.logger.history[-1], key


@pytest.mark.learning
def test_gspo_raises_the_toy_reward(tiny):
    algo = check_learning("gspo", tiny)
    # the paper's clip range (3e-4 / 4e-4) binds once the first epoch has moved the policy
    # measured: every iteration clips some texts under 4 CPU kernel settings (docs/testing.md)
    clipped = [h["train/clip_ratio_low"] + h["train/clip_ratio_high"] for h in algo.logger.history]
    assert min(clipped) > 0, clipped


def text_rewards(algo) -> np.ndarray:
    """(B,) each rollout text's summed reward, read from the buffer at the text's steps."""
    rollout, rewards = algo.rollout, algo.buffer.rewards
    return np.array([rewards[:length, c].sum() for c, length in zip(rollout.columns, rollout.lengths)])


def hand_grpo(rewards: np.ndarray, group_size: int, scale: str) -> np.ndarray:
    """Shao et al. 2024, section 4.1.2, with TRL's unbiased std, eps 1e-4 and scale_rewards."""
    groups = rewards.reshape(-1, group_size)
    centred = groups - groups.mean(axis=1, keepdims=True)
    if scale == "none":
        return centred.reshape(-1)
    std = groups.std(axis=1, ddof=1, keepdims=True) if scale == "group" else rewards.std(ddof=1)
    return (centred / (std + 1e-4)).reshape(-1)


@pytest.mark.parametrize(
    "settings",
    [
        {"scale": "group"},
        {"scale": "batch"},
        {"scale": "none"},
        {"group_size": 2},
        {"kl_coef": 0.05},  # the KL goes into the loss (GRPO's default): the rewards stay the scores
    ],
)
def test_grpo_advantages_are_each_text_reward_standardised_in_its_group(tiny, settings):
    algo = toy_algo(GRPO, tiny, **settings)
    algo.collect_rollouts()
    rollout = algo.rollout
    np.testing.assert_array_equal(rollout.columns, np.arange(8))  # one text per env, in order
    # the outcome reward at each text's last step, nothing else (no KL in the reward)
    np.testing.assert_array_equal(text_rewards(algo), rollout.scores)
    assert np.ptp(rollout.scores) > 0  # something to standardise
    expected = hand_grpo(rollout.scores, algo.group_size, settings.get("scale", "group"))
    advantages = algo.advantages(algo.group_batch()).numpy()
    assert advantages.shape == (8,)
    # float32 against float64
    np.testing.assert_allclose(advantages, expected, rtol=1e-5, atol=1e-5)

    algo.train()
    for i, (column, length) in enumerate(zip(rollout.columns, rollout.lengths)):
        np.testing.assert_allclose(algo.buffer.advantages[:length, column], expected[i], rtol=1e-5, atol=1e-5)
    algo.close()


def test_dynamic_sampling_trains_on_groups_whose_scores_differ(tiny):
    # 2-token texts in pairs: most pairs score alike, so rounds are drawn again
    algo = toy_algo(GRPO, tiny, dynamic_sampling=True, group_size=2, max_new_tokens=2, seed=1)
    algo.collect_rollouts()
    rollout, logged = algo.rollout, algo.logger.values
    # measured: more than one round under 4 CPU kernel settings (docs/testing.md; 3 rounds by default)
    assert logged["rollout/sampling_rounds"] > 1 and rollout.columns.max() >= 8
    groups = rollout.scores.reshape(-1, 2)
    # every group kept has a gradient, unless the rounds ran out and dropped groups topped the batch up
    assert (np.ptp(groups, axis=1) > 0).sum() == len(groups) - logged["rollout/sampling_shortfall"]
    assert len(set(rollout.columns)) == 8 and np.all(np.diff(rollout.columns.reshape(-1, 2), axis=1) == 1)
    np.testing.assert_array_equal(text_rewards(algo), rollout.scores)  # each kept text's own buffer column
    expected = hand_grpo(rollout.scores, 2, "group")
    np.testing.assert_allclose(algo.advantages(algo.group_batch()).numpy(), expected, rtol=1e-5, atol=1e-5)
    algo.train()
    for i, (column, length) in enumerate(zip(rollout.columns, rollout.lengths)):
        np.testing.assert_allclose(algo.buffer.advantages[:length, column], expected[i], rtol=1e-5, atol=1e-5)
    algo.close()
