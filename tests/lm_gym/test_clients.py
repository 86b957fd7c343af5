"""``TextGen-v1`` through other libraries' own APIs: the reward each client sees carries the KL term.

Every test runs the same actions from the same seed twice, with ``kl_coef=0`` and ``kl_coef=0.5``, and calls
nothing of lm-gym's beyond ``import lm_gym`` (which registers the env): the per-step reward
``kl_coef * log pi_ref(a_t|s_t)`` is negative for every real step, so the second run's rewards are lower at
every step. A client that dropped the env's reward, or an env that needed a side channel for its KL, fails.
"""

from __future__ import annotations

import functools
import multiprocessing
import pickle

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.vector import AutoresetMode
from stable_baselines3 import PPO
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecMonitor
from torch import nn
from torch.distributions import Categorical

import lm_gym  # noqa: F401  (registers TextGen-v1)

ENV_ID = "TextGen-v1"
# A process that has not imported lm_gym (spawn/forkserver workers under pytest or in a notebook) finds the
# env through Gymnasium's "module:id" form, which imports the module first.
WORKER_ENV_ID = "lm_gym:TextGen-v1"
MAX_NEW_TOKENS = 4
MAX_PROMPT_TOKENS = 8
# Byte tokens of "hi wo" for the fixed-action runs: tiny's EOS is 256, so every episode runs to max_new_tokens.
TOKENS = (104, 105, 32, 119, 111, 33)
KL_COEF = 0.5
NUM_ENVS = 2


def env_kwargs(kl_coef: float, max_new_tokens: int = MAX_NEW_TOKENS) -> dict:
    return {
        "model": "tiny",
        "max_new_tokens": max_new_tokens,
        "max_prompt_tokens": MAX_PROMPT_TOKENS,
        "kl_coef": kl_coef,
    }


def assert_kl_in_rewards(without_kl, with_kl) -> None:
    """Same seed, same actions: the rewards with ``kl_coef > 0`` are lower at every real step (the KL term
    ``kl_coef * log pi_ref(a|s)`` is negative), nothing else differs."""
    without_kl, with_kl = np.asarray(without_kl, dtype=np.float64), np.asarray(with_kl, dtype=np.float64)
    assert without_kl.shape == with_kl.shape and without_kl.size > 0
    assert np.all(with_kl < without_kl), (
        f"rewards without KL {without_kl.tolist()}, with KL {with_kl.tolist()}"
    )


def fixed_token_rollout(envs) -> tuple[np.ndarray, list[dict], np.ndarray]:
    """Every row of a vector env takes the tokens of ``TOKENS`` (one episode of ``MAX_NEW_TOKENS``) from seed
    0; the rewards (T, N), the infos (reset first) and the last step's ``terminated``. The env is closed."""
    _, info = envs.reset(seed=0)
    rewards, infos = [], [info]
    for token in TOKENS[:MAX_NEW_TOKENS]:
        _, reward, terminated, _, info = envs.step(np.full(NUM_ENVS, token))
        rewards.append(reward)
        infos.append(info)
    envs.close()
    return np.array(rewards), infos, terminated


@pytest.fixture
def torchrl_envs():
    """``torchrl.envs``, with the start method TorchRL's import sets in a fresh process (spawn, unless one was
    chosen before), whichever test imported it first; the suite's own start method is restored afterwards."""
    method = multiprocessing.get_start_method(allow_none=True)
    envs = pytest.importorskip("torchrl.envs", reason="TorchRL is not installed")
    if method is None:
        multiprocessing.set_start_method("spawn", force=True)
    yield envs
    multiprocessing.set_start_method(method, force=True)


# ---------------------------------------------------------------------------------------------- Gymnasium
def test_single_env_with_record_episode_statistics():
    def run(kl_coef: float) -> tuple[np.ndarray, float]:
        env = gym.wrappers.RecordEpisodeStatistics(gym.make(ENV_ID, **env_kwargs(kl_coef)))
        # one int64 Box: no FlattenObservation or Dict handling needed by any client
        length = MAX_PROMPT_TOKENS + MAX_NEW_TOKENS
        assert isinstance(env.observation_space, gym.spaces.Box)
        assert env.observation_space.dtype == np.int64 and env.observation_space.shape == (length,)
        obs, _ = env.reset(seed=0)
        assert obs in env.observation_space
        rewards = []
        for t, token in enumerate(TOKENS[:MAX_NEW_TOKENS]):
            obs, reward, terminated, truncated, info = env.step(token)
            rewards.append(reward)
            assert terminated == (t == MAX_NEW_TOKENS - 1) and not truncated
        env.close()
        return np.array(rewards), info["episode"]["r"]

    rewards, episode_return = run(0.0)
    rewards_kl, episode_return_kl = run(KL_COEF)
    assert_kl_in_rewards(rewards, rewards_kl)
    assert episode_return_kl == pytest.approx(rewards_kl.sum(), rel=1e-5)
    assert episode_return_kl < episode_return


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_gymnasium_sync_and_async_vector_env(mode):
    def run(kl_coef: float) -> np.ndarray:
        envs = gym.make_vec(ENV_ID, num_envs=NUM_ENVS, vectorization_mode=mode, **env_kwargs(kl_coef))
        rewards, infos, terminated = fixed_token_rollout(envs)
        assert terminated.all() and np.isfinite(infos[-1]["score"]).all()
        return rewards

    assert_kl_in_rewards(run(0.0), run(KL_COEF))


def test_native_vector_env_and_its_info():
    def run(kl_coef: float) -> np.ndarray:
        envs = gym.make_vec(ENV_ID, num_envs=NUM_ENVS, **env_kwargs(kl_coef))
        assert envs.metadata["autoreset_mode"] == AutoresetMode.SAME_STEP  # the default
        rewards, infos, terminated = fixed_token_rollout(envs)
        for info in infos:  # the same keys every step: one value per env and Gymnasium's "_key" mask
            for key in ("ref_log_prob", "score", "prompt_truncated"):
                assert info[key].shape == info["_" + key].shape == (NUM_ENVS,), key
                assert info["_" + key].dtype == np.bool_, key
        # same-step autoreset: the last step's info of each row is in final_info, with the same keys
        final = infos[-1]["final_info"]
        assert terminated.all() and final["_score"].all() and np.isfinite(final["score"]).all()
        assert set(final) == set(infos[-1]) - {"final_info", "_final_info", "final_obs", "_final_obs"}
        return rewards

    assert_kl_in_rewards(run(0.0), run(KL_COEF))


def test_native_vector_env_with_vector_record_episode_statistics():
    def run(kl_coef: float) -> tuple[np.ndarray, np.ndarray]:
        envs = gym.wrappers.vector.RecordEpisodeStatistics(
            gym.make_vec(ENV_ID, num_envs=NUM_ENVS, **env_kwargs(kl_coef))
        )
        rewards, infos, _ = fixed_token_rollout(envs)
        assert infos[-1]["_episode"].all()
        return rewards, infos[-1]["episode"]["r"]

    rewards, episode_returns = run(0.0)
    rewards_kl, episode_returns_kl = run(KL_COEF)
    assert_kl_in_rewards(rewards, rewards_kl)
    np.testing.assert_allclose(episode_returns_kl, rewards_kl.sum(axis=0), rtol=1e-5)
    assert (episode_returns_kl < episode_returns).all()


def test_time_limit_shorter_than_max_new_tokens_scores_the_text():
    limit = 3
    env = gym.make(ENV_ID, max_episode_steps=limit, **env_kwargs(KL_COEF, max_new_tokens=6))
    env.reset(seed=0)
    for t, token in enumerate(TOKENS[:limit]):
        _, reward, terminated, truncated, info = env.step(token)
        if t < limit - 1:
            assert not terminated and not truncated
    assert terminated and truncated  # the text ends (and is scored) where the TimeLimit cuts it
    assert np.isfinite(info["score"]) and np.isfinite(reward)
    env.close()


def test_pickle_round_trip():
    env = gym.make(ENV_ID, **env_kwargs(KL_COEF))
    restored = pickle.loads(pickle.dumps(env))
    runs = []
    for e in (env, restored):
        obs, _ = e.reset(seed=0)
        steps = [e.step(token)[:2] for token in TOKENS[:MAX_NEW_TOKENS]]
        runs.append((obs, [o for o, _ in steps], [r for _, r in steps]))
        e.close()
    (obs, observations, rewards), (obs_restored, observations_restored, rewards_restored) = runs
    np.testing.assert_array_equal(obs_restored, obs)
    np.testing.assert_array_equal(observations_restored, observations)
    np.testing.assert_allclose(rewards_restored, rewards, rtol=1e-6)  # kl_coef survives: the KL term too


def test_v0_is_deprecated_in_favour_of_v1(monkeypatch):
    # Gymnasium warns (DeprecationWarning) before it raises; the suite fails on deprecation warnings from our
    # own calls, and this call is deprecated on purpose.
    monkeypatch.setattr(gym.logger, "min_level", gym.logger.ERROR)
    with pytest.raises(gym.error.DeprecatedEnv, match="TextGen-v1"):
        gym.make("TextGen-v0", model="tiny")


# ------------------------------------------------------------------------------------------------- CleanRL
@pytest.mark.parametrize("vectorization_mode", ["vector_entry_point", "sync"])
def test_cleanrl_style_loop(vectorization_mode):
    """CleanRL's rollout (ppo.py): float buffers shaped from single_observation_space, torch.Tensor(next_obs),
    a Categorical over an MLP's logits; the native env's same-step autoreset, or Gymnasium's next-step one."""
    steps = 2 * MAX_NEW_TOKENS  # crosses an episode end

    def run(kl_coef: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        envs = gym.make_vec(
            ENV_ID, num_envs=NUM_ENVS, vectorization_mode=vectorization_mode, **env_kwargs(kl_coef)
        )
        torch.manual_seed(0)
        agent = nn.Sequential(
            nn.Linear(int(np.prod(envs.single_observation_space.shape)), 16),
            nn.Tanh(),
            nn.Linear(16, envs.single_action_space.n),
        )
        obs = torch.zeros((steps, NUM_ENVS) + envs.single_observation_space.shape)
        actions = torch.zeros((steps, NUM_ENVS) + envs.single_action_space.shape)
        rewards = torch.zeros((steps, NUM_ENVS))
        dones = torch.zeros((steps, NUM_ENVS))
        next_obs, _ = envs.reset(seed=0)
        next_obs, next_done = torch.Tensor(next_obs), torch.zeros(NUM_ENVS)
        for step in range(steps):
            obs[step], dones[step] = next_obs, next_done
            with torch.no_grad():
                action = Categorical(logits=agent(next_obs)).sample()
            actions[step] = action
            next_obs, reward, terminations, truncations, _ = envs.step(action.cpu().numpy())
            rewards[step] = torch.tensor(reward).view(-1)
            next_obs = torch.Tensor(next_obs)
            next_done = torch.Tensor(np.logical_or(terminations, truncations))
        next_step = envs.metadata["autoreset_mode"] == AutoresetMode.NEXT_STEP
        envs.close()
        return actions, rewards, dones, next_step

    actions, rewards, dones, next_step = run(0.0)
    actions_kl, rewards_kl, dones_kl, _ = run(KL_COEF)
    assert torch.equal(actions, actions_kl) and torch.equal(dones, dones_kl)
    assert next_step == (vectorization_mode == "sync")
    # NEXT_STEP: the step after an episode's end only restarts the env (reward 0 with or without KL); with
    # SAME_STEP every step is a step of an episode
    restart = dones.bool() if next_step else torch.zeros_like(dones, dtype=torch.bool)
    assert dones.bool().any()
    assert_kl_in_rewards(rewards[~restart], rewards_kl[~restart])
    assert (rewards[restart] == 0).all() and (rewards_kl[restart] == 0).all()


# -------------------------------------------------------------------------------------- stable-baselines3
@pytest.mark.parametrize(
    "vec_env_cls, start_method",
    [
        (DummyVecEnv, None),
        (SubprocVecEnv, "fork"),
        # spawned workers import torch and lm_gym anew: seconds each
        pytest.param(SubprocVecEnv, "spawn", marks=pytest.mark.slow),
    ],
)
def test_sb3_vec_env_with_vec_monitor(vec_env_cls, start_method):
    def run(vec_env_cls: type, start_method: str | None, kl_coef: float) -> tuple[np.ndarray, np.ndarray]:
        env_fns = [functools.partial(gym.make, WORKER_ENV_ID, **env_kwargs(kl_coef)) for _ in range(NUM_ENVS)]
        options = {} if start_method is None else {"start_method": start_method}
        venv = VecMonitor(vec_env_cls(env_fns, **options))
        venv.seed(0)
        venv.reset()
        rewards = []
        for token in TOKENS[:MAX_NEW_TOKENS]:
            venv.step_async(np.full(NUM_ENVS, token))
            _, reward, dones, infos = venv.step_wait()
            rewards.append(reward)
        venv.close()
        assert dones.all()
        return np.array(rewards), np.array([info["episode"]["r"] for info in infos])

    # the run without KL in-process (a spawned worker costs seconds), the one with KL through vec_env_cls
    rewards, episode_returns = run(DummyVecEnv, None, 0.0)
    rewards_kl, episode_returns_kl = run(vec_env_cls, start_method, KL_COEF)
    assert_kl_in_rewards(rewards, rewards_kl)
    np.testing.assert_allclose(episode_returns_kl, rewards_kl.sum(axis=0), rtol=1e-5)
    assert (episode_returns_kl < episode_returns).all()


def test_sb3_ppo_before_and_after_load(tmp_path):
    def venv(kl_coef: float) -> VecMonitor:
        return VecMonitor(
            DummyVecEnv([functools.partial(gym.make, ENV_ID, **env_kwargs(kl_coef)) for _ in range(NUM_ENVS)])
        )

    def rollout_rewards(model: PPO) -> np.ndarray:
        model.learn(total_timesteps=MAX_NEW_TOKENS * NUM_ENVS)  # one rollout of n_steps, then one update
        model.get_env().close()
        return model.rollout_buffer.rewards.copy()  # (n_steps, n_envs)

    rewards = {}
    for kl_coef in (0.0, KL_COEF):
        model = PPO(
            "MlpPolicy",
            venv(kl_coef),
            n_steps=MAX_NEW_TOKENS,
            batch_size=MAX_NEW_TOKENS * NUM_ENVS,
            n_epochs=1,
            seed=0,
            device="cpu",
        )
        rewards[kl_coef] = rollout_rewards(model)
    assert_kl_in_rewards(rewards[0.0], rewards[KL_COEF])

    model.save(tmp_path / "ppo")
    loaded_rewards = {}
    for kl_coef in (0.0, KL_COEF):
        loaded = PPO.load(tmp_path / "ppo", env=venv(kl_coef), device="cpu")
        loaded.set_random_seed(0)
        loaded_rewards[kl_coef] = rollout_rewards(loaded)
    assert_kl_in_rewards(loaded_rewards[0.0], loaded_rewards[KL_COEF])


# ------------------------------------------------------------------------------------------------ TorchRL
def _torchrl_rollouts(make, make_with_kl=None) -> tuple:
    """Two default rollouts (random actions from the env's action spec), ``make(0.0)`` and
    ``(make_with_kl or make)(KL_COEF)``: the second one's rewards carry the KL term."""
    rollouts = []
    for kl_coef, factory in ((0.0, make), (KL_COEF, make_with_kl or make)):
        env = factory(kl_coef)
        env.set_seed(0)
        torch.manual_seed(0)
        rollouts.append(env.rollout(MAX_NEW_TOKENS))
        env.close()
    without_kl, with_kl = rollouts
    assert torch.equal(without_kl["action"], with_kl["action"])
    assert_kl_in_rewards(without_kl["next", "reward"].numpy(), with_kl["next", "reward"].numpy())
    return without_kl, with_kl


def test_torchrl_gym_wrapper_single_env(torchrl_envs):
    _torchrl_rollouts(lambda kl_coef: torchrl_envs.GymWrapper(gym.make(ENV_ID, **env_kwargs(kl_coef))))


# TorchRL's GymWrapper refuses a vector env in NEXT_STEP mode (GymWrapper._validate_env): the native env's
# default is SAME_STEP; make_vec takes another autoreset_mode as a keyword (vector_kwargs are refused for a
# vector_entry_point).
@pytest.mark.parametrize("autoreset_mode", [None, AutoresetMode.DISABLED], ids=["default", "disabled"])
def test_torchrl_gym_wrapper_vector_env(torchrl_envs, autoreset_mode):
    def make(kl_coef: float):
        mode = {} if autoreset_mode is None else {"autoreset_mode": autoreset_mode}
        return torchrl_envs.GymWrapper(gym.make_vec(ENV_ID, num_envs=NUM_ENVS, **mode, **env_kwargs(kl_coef)))

    _, with_kl = _torchrl_rollouts(make)
    if autoreset_mode is None:
        # TorchRL reads the info of an autoresetting vector env (not of a DISABLED one): the numeric keys reach
        # the tensordict, and at the last step the score comes from final_info
        assert torch.isfinite(with_kl["next", "score"][:, -1]).all()


def test_torchrl_gym_env_num_envs(torchrl_envs):
    """GymEnv builds a Gymnasium AsyncVectorEnv of ``gym.make(env_name, **kwargs)`` in spawned workers (seconds
    each): the run without KL is its in-process twin, a SyncVectorEnv of the same envs."""

    def in_process(kl_coef: float):
        envs = gym.make_vec(
            ENV_ID,
            num_envs=NUM_ENVS,
            vectorization_mode="sync",
            vector_kwargs={"autoreset_mode": AutoresetMode.SAME_STEP},
            **env_kwargs(kl_coef),
        )
        return torchrl_envs.GymWrapper(envs)

    def gym_env(kl_coef: float):
        return torchrl_envs.GymEnv(WORKER_ENV_ID, num_envs=NUM_ENVS, **env_kwargs(kl_coef))

    _, with_kl = _torchrl_rollouts(in_process, gym_env)
    assert with_kl.batch_size[0] == NUM_ENVS


# ----------------------------------------------------------------------------------------------- Tianshou
@pytest.mark.slow  # Tianshou's replay buffer compiles with numba on its first use: seconds
@pytest.mark.parametrize("venv_cls", ["DummyVectorEnv", "SubprocVectorEnv"])
def test_tianshou_collector(venv_cls):
    tianshou_env = pytest.importorskip("tianshou.env", reason="Tianshou is not installed")
    from tianshou.algorithm.modelfree.reinforce import DiscreteActorPolicy
    from tianshou.data import Collector
    from tianshou.utils.net.common import Net
    from tianshou.utils.net.discrete import DiscreteActor

    def run(kl_coef: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        envs = getattr(tianshou_env, venv_cls)(
            [functools.partial(gym.make, WORKER_ENV_ID, **env_kwargs(kl_coef)) for _ in range(NUM_ENVS)]
        )
        action_space, observation_space = envs.action_space[0], envs.observation_space[0]
        torch.manual_seed(0)
        net = Net(state_shape=observation_space.shape, hidden_sizes=[16])
        actor = DiscreteActor(preprocess_net=net, action_shape=action_space.n, softmax_output=False)
        policy = DiscreteActorPolicy(
            actor=actor, action_space=action_space, observation_space=observation_space
        )
        collector = Collector(policy, envs)
        collector.reset(gym_reset_kwargs={"seed": 0})
        stats = collector.collect(n_episode=NUM_ENVS)
        buffer = collector.buffer
        indices = buffer.sample_indices(0)  # every stored transition
        envs.close()
        return buffer.act[indices], buffer.rew[indices], np.asarray(stats.returns)

    actions, rewards, returns = run(0.0)
    actions_kl, rewards_kl, returns_kl = run(KL_COEF)
    np.testing.assert_array_equal(actions, actions_kl)
    assert_kl_in_rewards(rewards, rewards_kl)
    assert returns.shape == (NUM_ENVS,) and (returns_kl < returns).all()
