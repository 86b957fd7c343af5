"""LMSB3Policy and KLRewardCallback: unmodified SB3 PPO/A2C and sb3-contrib TRPO train a causal LM on
TextGen-v1 with the exact KL penalty; SB3's VecNormalize and SubprocVecEnv, and sb3-contrib's MaskablePPO, on
TextGen-v1."""

import copy
import functools

import gymnasium as gym
import numpy as np
import pytest
import torch
from sb3_contrib import TRPO, MaskablePPO
from stable_baselines3 import A2C, PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecNormalize

import lm_gym  # noqa: F401  (registers TextGen-v1)
from algorithms.sb3 import KLRewardCallback, LMSB3Policy
from lm_gym.models import tiny_causal_lm
from lm_gym.spaces import PAD, seq2seq_observation_space, token_observation_space

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


def env_kwargs(tiny, toy_task, **overrides):
    model, tokenizer = tiny
    kwargs = dict(
        model=model,  # the reference: the shared, frozen fixture
        tokenizer=tokenizer,
        task=toy_task,
        reward=zero_score,
        kl_coef=KL_COEF,
        max_new_tokens=NEW_TOKENS,
        max_prompt_tokens=PROMPT_TOKENS,
        render_mode=None,  # else make_vec_env asks for "rgb_array" (TextGen-v1 warns, renders nothing)
    )
    return {**kwargs, **overrides}


def vec_env(tiny, toy_task, **overrides):
    """SB3's usual VecEnv: two single envs, each in a ``Monitor``, in a ``DummyVecEnv``."""
    return make_vec_env("TextGen-v1", n_envs=2, seed=0, env_kwargs=env_kwargs(tiny, toy_task, **overrides))


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


class EnvRewards(BaseCallback):
    """A copy of the env's rewards at every step, taken before anything adds to that array in place (a
    ``KLRewardCallback`` listed after this one, SB3's ``gamma * V(final observation)`` on a truncated
    episode), and the steps that ended an episode."""

    def __init__(self) -> None:
        super().__init__()
        self.rewards: list[np.ndarray] = []
        self.dones: list[np.ndarray] = []

    def _on_step(self) -> bool:
        self.rewards.append(self.locals["rewards"].copy())
        self.dones.append(self.locals["dones"].copy())
        return True


class KLRewardCheck(BaseCallback):
    """Listed after ``KLRewardCallback``: at every env step the reward SB3 is about to store is the whole k1
    KL term, ``-beta * (log pi - log pi_ref)``, from the log-prob the policy sampled with and the env's
    ``info["ref_log_prob"]`` (the score is 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.steps = 0

    def _on_step(self) -> bool:
        log_probs = self.locals["log_probs"].cpu().numpy()  # (n_envs,) what the policy returned
        for i, info in enumerate(self.locals["infos"]):
            self.steps += 1
            kl_term = -KL_COEF * (float(log_probs[i]) - info["ref_log_prob"])
            # measured: equal under 4 CPU kernel settings (docs/testing.md)
            assert self.locals["rewards"][i] == pytest.approx(kl_term, abs=1e-6)
        return True


def assert_stored_rewards_carry_the_kl(agent, env_rewards: EnvRewards, beta: float = KL_COEF) -> None:
    """The last rollout's stored rewards are the env's minus ``beta`` times the stored sampling log-probs,
    exactly as KLRewardCallback computes them (in float64, stored as the buffer's float32)."""
    buffer = agent.rollout_buffer
    env = np.stack(env_rewards.rewards[-buffer.buffer_size :])  # (n_steps, n_envs) as the env gave them
    expected = (env - beta * as_collected(buffer, buffer.log_probs).astype(np.float64)).astype(np.float32)
    np.testing.assert_array_equal(as_collected(buffer, buffer.rewards), expected)


def as_collected(buffer, array: np.ndarray) -> np.ndarray:
    """A rollout buffer's array as it was collected, (n_steps, n_envs): once the update has read the buffer,
    SB3 has swapped and flattened the arrays it samples (``log_probs``, not ``rewards``) to
    (n_envs * n_steps, 1)."""
    if array.shape == (buffer.buffer_size, buffer.n_envs):
        return array
    return array.reshape(buffer.n_envs, buffer.buffer_size).T


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
    env = vec_env(tiny, toy_task)
    agent = algorithm(
        LMSB3Policy, env, policy_kwargs=dict(lm=copy.deepcopy(model), tokenizer=tokenizer), seed=0, **settings
    )
    recorded, check = EnvRewards(), KLRewardCheck()
    agent.learn(steps, callback=[recorded, KLRewardCallback(), check])

    before = dict(model.named_parameters())
    changed = [n for n, p in agent.policy.lm.named_parameters() if not torch.equal(p, before[n])]
    assert changed, f"{name} left the LM untouched"
    assert agent.policy.value_net.weight.abs().sum() > 0  # the critic head trained too (it starts at 0)
    assert not agent.policy.lm.training  # dropout stayed off through SB3's set_training_mode(True)

    assert check.steps == steps  # every step's stored reward was the KL term
    assert_stored_rewards_carry_the_kl(agent, recorded)
    rewards = agent.rollout_buffer.rewards  # the last rollout: KL terms (the score is 0)
    assert np.isfinite(rewards).all()
    assert (rewards != 0).mean() > 0.9  # the trained policy is no longer the reference
    env.close()


@pytest.mark.parametrize("name", ["PPO", "A2C"])
def test_sb3_adds_no_bootstrap_at_max_new_tokens(name, tiny, toy_task):
    """The end at max_new_tokens is terminal (scored): SB3's buffer holds the env's rewards as they were,
    where a truncation would have made it add gamma * V(final text) at the last step of each episode."""
    algorithm, settings = {"PPO": (PPO, dict(batch_size=16, n_epochs=1)), "A2C": (A2C, {})}[name]
    model, tokenizer = tiny
    env = vec_env(tiny, toy_task, stop_token_ids=[])  # no stop token: every episode ends at max_new_tokens
    policy_kwargs = dict(lm=copy.deepcopy(model), tokenizer=tokenizer)
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
    ids = np.full((2, length), PAD)
    for i, seq in enumerate(seqs):  # left-padded with -1, as the env observes
        ids[i, length - len(seq) :] = seq
    obs = torch.tensor(ids, dtype=torch.float32)  # float32, as SB3 < 2.7.1's rollout buffer stores them
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


def test_a_policy_equal_to_the_reference_has_the_envs_log_probs(tiny, toy_task):
    """On the env's own observations, the log pi of SB3's rollout call, of ``predict``'s distribution and of
    ``evaluate_actions`` on the buffer's float32 copy is the env's ``log pi_ref`` when the LM is the reference
    (at the same temperature): the env's half and KLRewardCallback's half of the KL cancel, the KL is 0."""
    temperature = 0.7
    policy = standalone_policy(tiny, temperature=temperature)
    env = gym.make("TextGen-v1", **env_kwargs(tiny, toy_task, temperature=temperature))
    obs, _ = env.reset(seed=3)
    for t in range(NEW_TOKENS):
        obs_tensor, _ = policy.obs_to_tensor(obs)  # int64, as SB3 hands the env's observation over
        with torch.no_grad():
            if t % 2 == 0:  # SB3's rollout call
                action, _, log_prob = policy(obs_tensor)
            else:  # model.predict()
                action = torch.as_tensor(policy.predict(obs)[0]).reshape(1)
                log_prob = policy.get_distribution(obs_tensor).log_prob(action)
            _, stored_log_prob, _ = policy.evaluate_actions(obs_tensor.float(), action)
        obs, reward, terminated, truncated, info = env.step(int(action[0]))
        # measured: |diff| <= 4.8e-07 under 4 CPU kernel settings (docs/testing.md)
        assert float(log_prob[0]) == pytest.approx(info["ref_log_prob"], abs=1e-5)
        assert float(stored_log_prob[0]) == float(log_prob[0])  # the same forward on the same ids
        assert reward == KL_COEF * info["ref_log_prob"]  # the env pays the reference's half, nothing else
        if terminated or truncated:
            break
    env.close()


def test_save_and_load_by_name(tiny, toy_task, tmp_path):
    env = vec_env(tiny, toy_task)
    policy_kwargs = dict(lm="tiny", tokenizer=tiny[1])
    agent = PPO(LMSB3Policy, env, n_steps=4, batch_size=8, n_epochs=1, policy_kwargs=policy_kwargs)
    agent.learn(8, callback=KLRewardCallback())
    agent.save(tmp_path / "ppo")
    loaded = PPO.load(tmp_path / "ppo", env=env)
    saved, restored = agent.policy.state_dict(), loaded.policy.state_dict()
    assert saved.keys() == restored.keys() and all(torch.equal(saved[k], restored[k]) for k in saved)
    # nothing to reconnect: the callback reads the log-probs SB3 sampled with, the env's kl_coef from the env
    recorded = EnvRewards()
    loaded.learn(8, callback=[recorded, KLRewardCallback()])
    assert len(recorded.rewards) == 4
    assert_stored_rewards_carry_the_kl(loaded, recorded)
    env.close()


def test_kl_reward_callback_follows_the_envs_kl_coef(tiny, toy_task):
    """The callback reads the envs' kl_coef at each rollout: set through the wrappers (env_method), the new
    beta is both halves' (SB3's set_attr would stop at the Monitor, where the env never reads it); envs
    whose kl_coef differ are refused."""
    env = vec_env(tiny, toy_task)
    agent = PPO("MlpPolicy", env, n_steps=4, batch_size=8, n_epochs=1, seed=0)
    agent.learn(8, callback=KLRewardCallback())
    env.env_method("set_wrapper_attr", "kl_coef", 0.25)
    assert [e.unwrapped.kl_coef for e in env.envs] == [0.25, 0.25]
    recorded = EnvRewards()
    agent.learn(8, callback=[recorded, KLRewardCallback()])
    assert_stored_rewards_carry_the_kl(agent, recorded, beta=0.25)

    env.env_method("set_wrapper_attr", "kl_coef", 0.0, indices=[0])
    with pytest.raises(ValueError, match="kl_coef differ"):
        agent.learn(8, callback=KLRewardCallback())
    env.close()


def make_env(kl_coef: float, toy_task) -> gym.Env:
    """A Monitor-wrapped env whose reference is loaded by name ("tiny": the fixture's weights, seed 0): a
    worker process gets it without pickling the shared fixture, which other tests called with
    output_hidden_states=True (transformers 5 then keeps hooks on a model that do not pickle)."""
    model, tokenizer = tiny_causal_lm(seed=0)
    return Monitor(gym.make("lm_gym:TextGen-v1", **env_kwargs((model, tokenizer), toy_task, kl_coef=kl_coef)))


@pytest.mark.slow
def test_a_subprocess_env_carries_the_kl_in_its_rewards(tiny, toy_task):
    """Through SubprocVecEnv's pipe the reward alone carries the env's half of the KL: on the same prompt with
    the same actions, the env in a subprocess (kl_coef KL_COEF) pays KL_COEF * log pi_ref where one in this
    process with kl_coef 0 pays 0; KLRewardCallback reads kl_coef across the pipe and adds the agent's half.
    One subprocess, started by SB3's default method (it imports torch anew: most of the test's time)."""
    remote = SubprocVecEnv([functools.partial(make_env, KL_COEF, toy_task)])
    local = DummyVecEnv([functools.partial(make_env, 0.0, toy_task)])
    try:
        for env in (remote, local):
            env.set_options({"prompt": "A slow"})
            env.reset()
        for t, token in enumerate(tiny[1]("Hello")["input_ids"]):
            _, remote_rewards, remote_dones, remote_infos = remote.step(np.array([token]))
            _, local_rewards, local_dones, local_infos = local.step(np.array([token]))
            ref_log_prob = remote_infos[0]["ref_log_prob"]
            # one reference, one text; another process may sum in another order (its own torch threads)
            # measured: |diff| <= 4.8e-07 under the sse kernel setting; 0 under the default and avx2 ones
            assert (
                local_infos[0]["ref_log_prob"] == pytest.approx(ref_log_prob, abs=1e-5) and ref_log_prob < 0
            )
            assert local_rewards[0] == 0.0 and remote_rewards[0] == KL_COEF * ref_log_prob
            assert remote_dones[0] == local_dones[0] == (t == NEW_TOKENS - 1)
        agent = PPO("MlpPolicy", remote, n_steps=4, batch_size=4, n_epochs=1, seed=0)
        recorded = EnvRewards()
        agent.learn(4, callback=[recorded, KLRewardCallback()])
        assert_stored_rewards_carry_the_kl(agent, recorded)
    finally:
        remote.close()
        local.close()


def test_vecnormalize_defaults_with_sb3s_mlp_policy(tiny, toy_task):
    """VecNormalize's defaults (normalised observations and rewards) suit a policy that reads numbers: SB3's
    MlpPolicy runs on them. (SB3 >= 2.7.1 stores observations in the space's dtype, int64 here, so its
    buffer keeps the normalised values truncated to integers: an MlpPolicy is better served by float32
    observations.)"""
    env = VecNormalize(vec_env(tiny, toy_task))
    agent = PPO("MlpPolicy", env, n_steps=4, batch_size=8, n_epochs=1, seed=0)
    agent.learn(8)
    assert agent.num_timesteps == 8
    obs = env.reset()
    assert obs.dtype == np.float32 and not np.array_equal(obs, obs.round())  # normalised: not token ids
    actions, _ = agent.predict(obs)
    assert actions.shape == (2,)
    env.close()


def test_lmsb3policy_needs_the_token_ids_through_vecnormalize(tiny, toy_task):
    """Normalised observations are not token ids: LMSB3Policy refuses them with the fix in the message;
    VecNormalize(norm_obs=False) keeps the ids (and may still normalise the rewards) and runs."""
    model, tokenizer = tiny
    policy_kwargs = dict(lm=copy.deepcopy(model), tokenizer=tokenizer)
    env = VecNormalize(vec_env(tiny, toy_task))
    agent = PPO(LMSB3Policy, env, n_steps=4, batch_size=8, n_epochs=1, policy_kwargs=policy_kwargs, seed=0)
    with pytest.raises(ValueError, match=r"norm_obs=False"):
        agent.learn(8)
    env.close()

    env = VecNormalize(vec_env(tiny, toy_task), norm_obs=False)
    agent = PPO(LMSB3Policy, env, n_steps=4, batch_size=8, n_epochs=1, policy_kwargs=policy_kwargs, seed=0)
    agent.learn(8)
    assert agent.num_timesteps == 8
    stored = agent.rollout_buffer.observations
    assert np.array_equal(stored, stored.round()) and stored.min() == PAD  # token ids, -1 as padding
    env.close()


def test_kl_reward_callback_refuses_normalised_rewards(tiny, toy_task):
    env = VecNormalize(vec_env(tiny, toy_task), norm_obs=False, norm_reward=True)
    agent = PPO("MlpPolicy", env, n_steps=4, batch_size=8, n_epochs=1)
    with pytest.raises(ValueError, match=r"norm_reward=False"):
        agent.learn(8, callback=KLRewardCallback())
    env.close()


def test_maskable_ppo_runs_on_textgen(tiny, toy_task):
    """sb3-contrib's MaskablePPO finds the env's action_masks() (every token allowed) and trains; the
    KLRewardCallback works with its rollout loop too."""
    env = vec_env(tiny, toy_task)
    masks = np.stack(env.env_method("action_masks"))
    assert masks.shape == (2, len(tiny[1])) and masks.dtype == bool and masks.all()
    agent = MaskablePPO("MlpPolicy", env, n_steps=4, batch_size=8, n_epochs=1, seed=0)
    recorded = EnvRewards()
    agent.learn(8, callback=[recorded, KLRewardCallback()])
    assert agent.num_timesteps == 8 and agent.rollout_buffer.action_masks.all()
    assert_stored_rewards_carry_the_kl(agent, recorded)
    env.close()


def test_rejects_spaces_that_do_not_fit(tiny):
    model, tokenizer = tiny
    vocab = len(tokenizer)
    with pytest.raises(ValueError, match="output logits"):
        LMSB3Policy(token_observation_space(vocab, 8), gym.spaces.Discrete(10), lambda _: 1e-4, lm=model)
    with pytest.raises(ValueError, match="integer Box of shape"):
        LMSB3Policy(gym.spaces.Box(0, 1, (8,)), gym.spaces.Discrete(vocab), lambda _: 1e-4, lm=model)
    with pytest.raises(ValueError, match="encoder-decoder observations"):
        LMSB3Policy(
            seq2seq_observation_space(vocab, 8, 4), gym.spaces.Discrete(vocab), lambda _: 1e-4, lm=model
        )
