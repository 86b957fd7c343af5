"""LMSB3Policy: unmodified SB3 PPO/A2C and sb3-contrib TRPO train a causal LM on TextGen-v0."""

import copy

import gymnasium as gym
import numpy as np
import pytest
import torch
from sb3_contrib import TRPO
from stable_baselines3 import A2C, PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env

import lm_gym  # noqa: F401  (registers TextGen-v0)
from algorithms.sb3 import LMSB3Policy
from lm_gym import PolicyLogProbCache
from lm_gym.spaces import token_observation_space

KL_COEF = 0.5
NEW_TOKENS = 5
PROMPT_TOKENS = 80  # the toy prompts are up to ~75 bytes, one token per byte


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on 2 shared cores, OpenMP threads that wait for each other cost far more."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def zero_score(prompts, completions):
    """Score 0 for every text: every non-zero reward is then the KL term."""
    return [0.0] * len(prompts)


def env_kwargs(tiny, toy_task, cache):
    model, tokenizer = tiny
    return dict(
        model=model,  # the reference: the shared, frozen fixture
        tokenizer=tokenizer,
        task=toy_task,
        reward=zero_score,
        kl_coef=KL_COEF,
        max_new_tokens=NEW_TOKENS,
        max_prompt_tokens=PROMPT_TOKENS,
        log_prob_cache=cache,
        render_mode=None,  # else make_vec_env asks for "rgb_array" (TextGen-v0 warns, renders nothing)
    )


def standalone_policy(tiny, **kwargs):
    model, tokenizer = tiny
    vocab = len(tokenizer)
    return LMSB3Policy(
        token_observation_space(vocab, PROMPT_TOKENS + NEW_TOKENS),
        gym.spaces.Discrete(vocab),
        lambda _: 1e-4,
        lm=copy.deepcopy(model),
        tokenizer=tokenizer,
        **kwargs,
    )


class KLRewardCheck(BaseCallback):
    """At every env step: the env found the policy's own log-prob in the cache, and the raw reward is
    exactly the KL term it implies (the score is 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.steps = self.hits = 0

    def _on_step(self) -> bool:
        log_probs = self.locals["log_probs"].cpu().numpy()  # (n_envs,) what the policy returned
        for i, info in enumerate(self.locals["infos"]):
            self.steps += 1
            if "policy_log_prob" in info:
                self.hits += 1
                assert info["policy_log_prob"] == float(log_probs[i])  # the very value, not a recomputation
                kl_term = -KL_COEF * (info["policy_log_prob"] - info["ref_log_prob"])
                # measured: equal under 4 CPU kernel settings (docs/testing.md)
                assert self.locals["rewards"][i] == pytest.approx(kl_term, abs=1e-5)
        return True


# (algorithm, settings, total timesteps). TRPO differentiates the KL separately for each parameter tensor
# (~40 backward passes through the LM per update, then double-backward Fisher-vector products): it gets
# four small updates (16 observations each) and few conjugate-gradient steps.
ALGORITHMS = {
    "PPO": (PPO, dict(n_steps=16, batch_size=16, n_epochs=2), 256),
    "A2C": (A2C, dict(n_steps=8), 256),
    "TRPO": (TRPO, dict(n_steps=8, batch_size=16, cg_max_steps=2, n_critic_updates=1), 64),
}


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_sb3_algorithm_trains_the_lm_with_the_kl_reward(name, tiny, toy_task):
    algorithm, settings, steps = ALGORITHMS[name]
    model, tokenizer = tiny
    cache = PolicyLogProbCache()
    env = make_vec_env("TextGen-v0", n_envs=2, seed=0, env_kwargs=env_kwargs(tiny, toy_task, cache))
    agent = algorithm(
        LMSB3Policy,
        env,
        policy_kwargs=dict(lm=copy.deepcopy(model), tokenizer=tokenizer, log_prob_cache=cache),
        seed=0,
        **settings,
    )
    check = KLRewardCheck()
    agent.learn(steps, callback=check)

    before = dict(model.named_parameters())
    changed = [n for n, p in agent.policy.lm.named_parameters() if not torch.equal(p, before[n])]
    assert changed, f"{name} left the LM untouched"
    assert agent.policy.value_net.weight.abs().sum() > 0  # the critic head trained too (it starts at 0)
    assert not agent.policy.lm.training  # dropout stayed off through SB3's set_training_mode(True)

    assert check.steps == steps and check.hits == check.steps  # every step's log pi(a|s) came from the cache
    rewards = agent.rollout_buffer.rewards  # the last rollout: KL terms (the score is 0)
    assert np.isfinite(rewards).all()
    assert (rewards != 0).mean() > 0.9
    env.close()


class EnvRewards(BaseCallback):
    """A copy of the env's rewards at every step, taken before SB3 adds anything to that array in place (its
    ``gamma * V(final observation)`` on a truncated episode), and the steps that ended an episode."""

    def __init__(self) -> None:
        super().__init__()
        self.rewards: list[np.ndarray] = []
        self.dones: list[np.ndarray] = []

    def _on_step(self) -> bool:
        self.rewards.append(self.locals["rewards"].copy())
        self.dones.append(self.locals["dones"].copy())
        return True


@pytest.mark.parametrize("name", ["PPO", "A2C"])
def test_sb3_adds_no_bootstrap_at_max_new_tokens(name, tiny, toy_task):
    """The end at max_new_tokens is terminal (scored): SB3's buffer holds the env's rewards as they were, where
    a truncation would have made it add gamma * V(final text) at the last step of each episode."""
    algorithm, settings = {"PPO": (PPO, dict(batch_size=16, n_epochs=1)), "A2C": (A2C, {})}[name]
    model, tokenizer = tiny
    cache = PolicyLogProbCache()
    # no stop token: every episode ends at max_new_tokens
    kwargs = {**env_kwargs(tiny, toy_task, cache), "stop_token_ids": []}
    env = make_vec_env("TextGen-v0", n_envs=2, seed=0, env_kwargs=kwargs)
    policy_kwargs = dict(lm=copy.deepcopy(model), tokenizer=tokenizer, log_prob_cache=cache)
    agent = algorithm(LMSB3Policy, env, n_steps=8, policy_kwargs=policy_kwargs, seed=0, **settings)
    assert agent.gamma > 0  # SB3's default 0.99: a bootstrap would add gamma * V
    torch.nn.init.normal_(agent.policy.value_net.weight)  # V != 0, so that a bootstrap would show
    recorded = EnvRewards()
    agent.learn(16, callback=recorded)  # one rollout of 8 steps x 2 envs

    dones = np.stack(recorded.dones)  # (8, 2)
    assert dones[NEW_TOKENS - 1].all() and dones.sum() == 2  # each env ended one episode, at max_new_tokens
    # measured: equal (float32, the buffer's dtype, on both sides)
    np.testing.assert_array_equal(agent.rollout_buffer.rewards, np.stack(recorded.rewards))
    env.close()


def test_evaluate_actions_is_a_direct_forward_at_the_last_position(tiny):
    model, tokenizer = tiny
    temperature = 0.7
    policy = standalone_policy(tiny, temperature=temperature)
    torch.nn.init.normal_(policy.value_net.weight)  # a non-trivial head to compare V against
    length = PROMPT_TOKENS + NEW_TOKENS
    seqs = [tokenizer(text)["input_ids"] for text in ("A slow", "Critics have been kind to")]
    ids = np.full((2, length), tokenizer.pad_token_id)
    mask = np.zeros((2, length))
    for i, seq in enumerate(seqs):  # left-padded, as the env observes
        ids[i, length - len(seq) :], mask[i, length - len(seq) :] = seq, 1
    # float32, as SB3's rollout buffer stores them
    obs = {"input_ids": torch.tensor(ids, dtype=torch.float32), "attention_mask": torch.tensor(mask).float()}
    actions = torch.tensor([65, 200])

    values, log_prob, entropy = policy.evaluate_actions(obs, actions)
    v_pred, lp, ent = values.detach(), log_prob.detach(), entropy.detach()

    reference = copy.deepcopy(model)  # output_hidden_states leaves hooks on a model: not on the fixture
    for i, seq in enumerate(seqs):
        with torch.no_grad():
            out = reference(input_ids=torch.tensor([seq]), output_hidden_states=True)  # no padding at all
        logp = torch.log_softmax(out.logits[0, -1].double() / temperature, -1)  # (V,)
        # measured: |diff| <= 4.8e-07 (relative 8.6e-08) under 4 CPU kernel settings (docs/testing.md)
        assert float(lp[i]) == pytest.approx(float(logp[actions[i]]), abs=1e-5)
        # measured: |diff| <= 9.5e-07 (relative 1.7e-07) under 4 CPU kernel settings (docs/testing.md)
        assert float(ent[i]) == pytest.approx(float(-(logp.exp() * logp).sum()), abs=1e-4)
        v = policy.value_net(out.hidden_states[-1][0, -1]).detach()
        # measured: |diff| <= 3.8e-06 (relative 1.2e-06) under 4 CPU kernel settings (docs/testing.md)
        assert float(v_pred[i, 0]) == pytest.approx(float(v), abs=1e-4)
    assert values.shape == (2, 1) and log_prob.shape == entropy.shape == (2,)

    (log_prob.sum() + values.sum()).backward()  # gradients reach the LM and the head ...
    assert (
        policy.lm.get_input_embeddings().weight.grad is not None and policy.value_net.weight.grad is not None
    )
    optimized = {p for group in policy.optimizer.param_groups for p in group["params"]}
    assert optimized == set(policy.parameters())  # ... and SB3's optimizer holds them all


def test_the_env_reads_exactly_the_policys_log_prob_from_the_cache(tiny, toy_task):
    cache = PolicyLogProbCache()
    policy = standalone_policy(tiny, log_prob_cache=cache)
    env = gym.make("TextGen-v0", **env_kwargs(tiny, toy_task, cache))
    obs, _ = env.reset(seed=3)
    for t in range(NEW_TOKENS):
        obs_tensor, _ = policy.obs_to_tensor(obs)
        with torch.no_grad():
            if t % 2 == 0:  # SB3's rollout call
                action, _, log_prob = policy(obs_tensor)
            else:  # model.predict(): records as well
                action = policy._predict(obs_tensor)
                log_prob = policy.get_distribution(obs_tensor).log_prob(action)
        obs, reward, terminated, truncated, info = env.step(int(action[0]))
        assert info["policy_log_prob"] == float(log_prob[0])
        # measured: equal under 4 CPU kernel settings (docs/testing.md)
        assert reward == pytest.approx(-KL_COEF * (info["policy_log_prob"] - info["ref_log_prob"]), abs=1e-6)
        if terminated or truncated:
            break
    env.close()


def test_save_and_load_by_name(tiny, toy_task, tmp_path):
    cache = PolicyLogProbCache()
    env = make_vec_env("TextGen-v0", n_envs=2, seed=0, env_kwargs=env_kwargs(tiny, toy_task, cache))
    policy_kwargs = dict(lm="tiny", tokenizer=tiny[1], log_prob_cache=cache)
    agent = PPO(LMSB3Policy, env, n_steps=4, batch_size=8, n_epochs=1, policy_kwargs=policy_kwargs)
    agent.learn(8)
    agent.save(tmp_path / "ppo")
    loaded = PPO.load(tmp_path / "ppo", env=env)
    saved, restored = agent.policy.state_dict(), loaded.policy.state_dict()
    assert saved.keys() == restored.keys() and all(torch.equal(saved[k], restored[k]) for k in saved)
    assert loaded.policy.log_prob_cache is not cache  # an unpickled copy: reconnect it
    loaded.policy.log_prob_cache = cache
    check = KLRewardCheck()
    loaded.learn(8, callback=check)
    assert check.hits == check.steps == 8
    env.close()


def test_rejects_spaces_that_do_not_fit(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="output logits"):
        LMSB3Policy(
            token_observation_space(len(tokenizer), 8), gym.spaces.Discrete(10), lambda _: 1e-4, lm=model
        )
    with pytest.raises(ValueError, match="Dict"):
        LMSB3Policy(gym.spaces.Box(0, 1, (8,)), gym.spaces.Discrete(len(tokenizer)), lambda _: 1e-4, lm=model)
