"""lm-gym: language-model fine-tuning from feedback as a Gymnasium RL problem.

``import lm_gym`` registers ``TextGen-v0`` (single env and native vector env)::

    import gymnasium as gym, lm_gym
    env = gym.make("TextGen-v0")                          # SmolLM2-135M, sentiment task, VADER reward
    envs = gym.make_vec("TextGen-v0", num_envs=16, model="tiny")
"""

from gymnasium.envs.registration import register, registry

from lm_gym.env import TextGenEnv, TextGenVectorEnv
from lm_gym.logprobs import PolicyLogProbCache

__all__ = ["PolicyLogProbCache", "TextGenEnv", "TextGenVectorEnv"]
__version__ = "0.1.0"

if "TextGen-v0" not in registry:
    register(
        id="TextGen-v0",
        entry_point="lm_gym.env:TextGenEnv",
        vector_entry_point="lm_gym.vector_env:TextGenVectorEnv",
        # Episodes end by themselves (EOS or max_new_tokens); no TimeLimit wrapper on top.
        max_episode_steps=None,
    )
