"""The on-policy core's rollout statistics, reward whitening and KL controller, on scripted texts."""

import numpy as np
import pytest
import torch

from algorithms.common.on_policy import AgentStep
from algorithms.ppo import PPO
from lm_gym.vector_env import step_values
from tests.toys import toy_algo

LETTER = 65  # "A"


def scripted(algo, stops: dict[int, set[int]]):
    """Replace ``algo``'s agent by a script: row ``i`` emits EOS at the steps ``stops[i]`` and "A" at every
    other step, so the texts' lengths are known. The log-probs are a constant; the env's KL is computed
    against the reference as for any agent."""
    eos = algo.policy.tokenizer.eos_token_id
    step = iter(range(algo.n_steps))

    def act(agent, obs):
        t = next(step)
        actions = torch.tensor([eos if t in stops.get(i, ()) else LETTER for i in range(algo.n_envs)])
        log_probs = torch.full((algo.n_envs,), -5.0)
        return AgentStep(actions, log_probs, torch.zeros(algo.n_envs), log_probs)

    algo._act = act
    return algo


def first_texts(buffer):
    """Per row, the steps of its first text: ``0 .. first done`` (or the whole rollout if none ended)."""
    out = []
    for env in range(buffer.n_envs):
        ended = np.flatnonzero(buffer.dones[:, env])
        out.append(slice(0, ended[0] + 1 if len(ended) else buffer.n_steps))
    return out


def test_rollout_statistics_are_over_the_first_text_of_each_row(tiny):
    """Row 0 ends three short texts, row 1 one full-length text, row 2 one text and then a cut one: the KL
    and the length are each row's first text's, every text once; every finished text is an episode."""
    zero = lambda prompts, completions: [0.0] * len(completions)  # noqa: E731
    algo = toy_algo(PPO, tiny, reward=zero, kl_coef=1.0, n_envs=3, max_new_tokens=8)
    stats = scripted(algo, {0: {1, 3, 5}, 2: {5}}).collect_rollouts()["stats"]
    buffer = algo.buffer
    # with a zero score and beta = 1 each step's reward is minus that step's KL
    kl = [-buffer.rewards[steps, env].sum() for env, steps in enumerate(first_texts(buffer))]
    # measured: equal under 4 CPU kernel settings (docs/testing.md; the same float64 sums)
    assert stats["rollout/kl"] == pytest.approx(np.mean(kl), rel=1e-12)
    assert stats["rollout/ep_len"] == np.mean([2, 8, 6])
    assert stats["rollout/episodes"] == 3 + 1 + 1
    assert stats["rollout/unfinished_texts"] == 0


def test_a_first_text_cut_by_the_rollout_counts_its_kl_so_far_and_no_score(tiny):
    """n_steps < max_new_tokens: row 1's first text is cut after 4 tokens. Its KL and length count as far as
    they went; the score is over the first texts that ended; the cut one is logged as unfinished."""
    length_score = lambda prompts, completions: [float(len(c)) for c in completions]  # noqa: E731
    algo = toy_algo(PPO, tiny, reward=length_score, kl_coef=1.0, n_envs=3, max_new_tokens=6, n_steps=4)
    rollout = scripted(algo, {0: {1}, 2: {3}}).collect_rollouts()
    stats, buffer = rollout["stats"], algo.buffer
    assert buffer.dones[:, 1].sum() == 0  # row 1 never ended
    scores = [1.0, 0.0, 3.0]  # "A" and "AAA" (EOS is not part of the text); row 1 has none yet
    # beta = 1: each step's reward is minus that step's KL, plus the score at a text's last step
    kl = [scores[env] - buffer.rewards[steps, env].sum() for env, steps in enumerate(first_texts(buffer))]
    # measured: equal under 4 CPU kernel settings (docs/testing.md; the same float64 sums)
    assert stats["rollout/kl"] == pytest.approx(np.mean(kl), rel=1e-12)
    assert stats["rollout/ep_len"] == np.mean([2, 4, 4])
    assert stats["rollout/rm_score"] == np.mean([1.0, 3.0])
    assert stats["rollout/unfinished_texts"] == 1
    assert rollout["texts"] == 3  # every row's first text is in the KL, so in the controller's count


def test_whitened_rewards_give_equal_returns_to_equal_scores_of_any_length(tiny):
    """Issue 14: two texts scored 1.0, of 2 and 10 tokens (no KL, gamma = lambda = 1). Shifting the mean gave
    them returns 2.667 and 0.0; dividing by the std alone gives both 1 / std, and a zero reward stays zero."""
    one = lambda prompts, completions: [1.0] * len(completions)  # noqa: E731
    algo = toy_algo(
        PPO, tiny, reward=one, n_envs=2, max_new_tokens=10, gamma=1.0, gae_lambda=1.0, whiten_rewards=True
    )
    scripted(algo, {0: {1}}).collect_rollouts()
    buffer = algo.buffer
    assert buffer.dones[:, 0].nonzero()[0].tolist() == [1] and buffer.dones[:, 1].nonzero()[0].tolist() == [9]
    std = buffer.dones.std() + 1e-8  # of the raw rewards: 1 where a text ended, 0 elsewhere
    # measured: equal under 4 CPU kernel settings (docs/testing.md)
    np.testing.assert_allclose(buffer.returns[0], [1 / std, 1 / std], rtol=1e-9)
    assert (buffer.rewards[buffer.dones == 0] == 0).all()


def test_adaptive_controller_counts_the_rollouts_texts(tiny, monkeypatch):
    """Ziegler et al. and TRL step beta by the batch's number of texts over the horizon: 8 texts, not the
    64 tokens of 8 envs x 8 steps."""
    algo = toy_algo(PPO, tiny, kl_coef=0.1, kl_target=1e-3, kl_horizon=100, n_epochs=1)
    calls = []
    update = algo.kl_controller.update
    monkeypatch.setattr(
        algo.kl_controller, "update", lambda kl, n_samples: calls.append(n_samples) or update(kl, n_samples)
    )
    algo.learn(1)
    assert calls == [algo.n_envs]
    kl = algo.logger.history[-1]["rollout/kl"]
    error = np.clip(kl / 1e-3 - 1, -0.2, 0.2)  # Ziegler et al. 2019, section 2.2
    # measured: equal under 4 CPU kernel settings (docs/testing.md; the same float64 operations)
    assert algo.kl_controller.value == pytest.approx(0.1 * (1 + error * algo.n_envs / 100), rel=1e-12)


def test_the_core_adds_the_agents_half_of_the_kl_to_the_envs_reward(tiny):
    """The env pays beta * log pi_ref(a_t); the core adds -beta * log pi(a_t) with the sampling log-prob, so the
    stored reward is RLHF's -beta * (log pi - log pi_ref) (+ the score at the end), token for token."""
    algo = scripted(toy_algo(PPO, tiny, kl_coef=0.3, whiten_rewards=False), {0: {3}})
    env_steps = []
    step = algo.envs.step

    def recorded_step(actions):
        out = step(actions)
        env_steps.append(out)
        return out

    algo.envs.step = recorded_step
    algo.collect_rollouts()
    algo.close()
    for t, (_, env_rewards, terminated, truncated, infos) in enumerate(env_steps):
        done = terminated | truncated  # same-step autoreset: the ended rows' info is in final_info
        ref, score = step_values(infos, "ref_log_prob", done), step_values(infos, "score", done)
        np.testing.assert_array_equal(env_rewards, 0.3 * ref + score)  # the env: the reference's half
        # float64 sums of the same values, only in another order (no CPU kernel involved)
        np.testing.assert_allclose(algo.buffer.rewards[t], -0.3 * (-5.0 - ref) + score, rtol=0, atol=1e-12)
