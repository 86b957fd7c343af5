"""lm-gym: language-model fine-tuning from feedback as a Gymnasium RL problem.

``import lm_gym`` registers ``TextGen-v1`` (single env and native vector env)::

    import gymnasium as gym, lm_gym
    env = gym.make("TextGen-v1")                          # SmolLM2-135M, sentiment task, VADER reward
    envs = gym.make_vec("TextGen-v1", num_envs=16, model="tiny")

``TextGen-v0`` is not registered any more: ``gym.make("TextGen-v0")`` raises Gymnasium's ``DeprecatedEnv``
error naming v1 (its reward and observation changed meaning; see the Version History of ``TextGenEnv``).
"""

from gymnasium.envs.registration import register, registry

from lm_gym.env import TextGenEnv, TextGenVectorEnv
from lm_gym.spaces import hf_inputs

__all__ = ["TextGenEnv", "TextGenVectorEnv", "hf_inputs"]
__version__ = "0.1.0"

if "TextGen-v1" not in registry:
    register(
        id="TextGen-v1",
        entry_point="lm_gym.env:TextGenEnv",
        vector_entry_point="lm_gym.vector_env:TextGenVectorEnv",
        # Episodes end by themselves (EOS or max_new_tokens); no TimeLimit wrapper on top.
        max_episode_steps=None,
    )
