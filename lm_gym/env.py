"""``TextGen-v0``: text generation as a Gymnasium environment (the single env and its documentation)."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lm_gym.vector_env import DEFAULT_MODEL, TextGenVectorEnv, _row, _row_info

__all__ = ["DEFAULT_MODEL", "TextGenEnv", "TextGenVectorEnv"]


class TextGenEnv(gym.Env):
    """Generate a continuation of a prompt, one token per step, rewarded by a reward model minus a KL penalty.

    ## Description

    The RL formulation of RLHF (Ziegler et al. 2019; InstructGPT, Ouyang et al. 2022). An episode starts
    from a prompt of the task (by default the opening of a movie review). At each step the agent appends
    one token; when the text is finished a reward model scores it. A per-token penalty keeps the agent's
    policy ``pi`` close to the frozen initial model ``pi_ref`` (the *reference*), which the environment
    holds and runs itself, KV-cached, one token per step.

    ## Action Space

    ``Discrete(vocab_size)``: the id of the next token (49,152 for SmolLM2; 257 for ``tiny``).

    ## Observation Space

    ``Dict(input_ids=Box(0, vocab_size-1, (L,), int64), attention_mask=Box(0, 1, (L,), int64))`` with
    ``L = max_prompt_tokens + max_new_tokens``: the prompt followed by the tokens generated so far,
    left-padded (the text sits at the right end; ``attention_mask`` is 1 on it).

    ## Rewards

    At every step ``t``: ``r_t = -kl_coef * KL_t`` with ``KL_t = log pi(a_t|s_t) - log pi_ref(a_t|s_t)``
    (the "k1" estimator; ``kl_estimator="k3"`` gives ``(exp(l) - 1) - l``, ``l = -KL_t``). At the last
    step the reward-model score of the finished text is added. ``log pi_ref`` comes from the reference's
    full softmax at ``temperature``; when the policy samples at a temperature, pass the same one so that
    both sides of the log-ratio describe the same distribution.

    ``log pi(a_t|s_t)`` is known only to the agent. It reaches the environment through one of two channels
    (see :mod:`lm_gym.logprobs`):

    * ``env.unwrapped.set_policy_log_prob(logp)`` right before ``step(action)`` (hand-written loops;
      the vector env's ``set_policy_log_probs`` is what lm-gym's own algorithms use). The agent computed
      it when it sampled, so no forward pass of the policy is repeated.
    * a :class:`~lm_gym.logprobs.PolicyLogProbCache` passed as ``log_prob_cache`` and shared with the
      policy (stable-baselines3: the policy records each batch of distributions; the environment looks up
      its own observation).

    Without either (a random agent), or with ``kl_coef=0``, the reward is the score alone and ``info``
    has no ``policy_log_prob``/``kl``.

    ## Starting State

    A prompt drawn uniformly from the task's ``split`` with the environment's seeded generator (or the
    ``options={"prompt": text}`` given to ``reset``), tokenized; a prompt longer than
    ``max_prompt_tokens`` keeps its *last* ``max_prompt_tokens`` tokens (the context nearest to the
    continuation) and ``info["prompt_truncated"]`` is True.

    ## Episode End

    * Termination: the agent emits a stop token (the tokenizer's EOS by default, ``stop_token_ids``).
    * Truncation: ``max_new_tokens`` tokens were generated without a stop token.

    Calling ``step`` after the end, without ``reset``, raises an error.

    ## Info

    Every step: ``prompt`` (str), ``text`` (the completion so far, stop token excluded), ``ref_log_prob``,
    ``kl_penalty`` (the KL part of the reward); when the policy's log-prob is known: ``policy_log_prob``
    and ``kl``. Last step: ``score`` (the reward-model score). Reset: ``prompt``, ``text`` (empty) and
    ``prompt_truncated``.

    ## Arguments

    ```python
    import gymnasium as gym, lm_gym
    env = gym.make("TextGen-v0", model="smollm2-135m", task="sentiment", kl_coef=0.05, max_new_tokens=48)
    envs = gym.make_vec("TextGen-v0", num_envs=16, model="tiny")  # native batched TextGenVectorEnv
    ```

    Args:
        model: the reference (initial) model: ``"smollm2-135m"`` (default, embedded), ``"tiny"``, a folder,
            a Hugging Face id, or a loaded ``PreTrainedModel`` (then pass ``tokenizer``; it is used as is,
            so pass a frozen copy, not the policy you train).
        tokenizer: tokenizer of a loaded ``model``; loaded with it otherwise.
        reward: a reward function ``(prompts, completions) -> scores``, ``"vader"``, or a reward model's
            name/folder/Hub id (see :func:`lm_gym.rewards.make_reward`). Default: the task's reward.
        task: a task name (``"sentiment"``) or a :class:`~lm_gym.tasks.Task`.
        prompts: prompts to use instead of the task's.
        split: ``"train"`` or ``"eval"`` prompts of the task.
        kl_coef: ``beta`` of the KL penalty, >= 0 (default 0.05, current TRL's fixed coefficient).
        kl_estimator: ``"k1"`` (default) or ``"k3"``.
        max_new_tokens: episode length limit (truncation).
        max_prompt_tokens: prompts are cut to their last ``max_prompt_tokens`` tokens.
        temperature: temperature of the reference's softmax; match the policy's sampling temperature.
        stop_token_ids: tokens that end an episode; default the tokenizer's EOS.
        device: where the reference runs; default CUDA when available, else CPU.
        dtype: the reference's weight dtype when loaded by name (log-probs are always float32).
        trust_remote_code: for models loaded by name; off unless you trust the checkpoint.
        log_prob_cache: a :class:`~lm_gym.logprobs.PolicyLogProbCache` shared with the policy.
        policy_adapter: for a LoRA policy: ``model`` is the peft model, whose base with the adapters off
            *is* the reference, and the env runs reference and policy (this adapter on) as one doubled
            batch per step, exposing the policy's logits as ``policy_logits`` (vector env). One forward
            through the shared weights instead of two models: no second copy of the LM in memory.
        async_reference: run the reference's next forward in a background thread, overlapped with the
            agent's own forward pass. Default: on for models of 20M parameters or more without
            ``policy_adapter``. The results agree with the synchronous path up to float rounding
            (the thread count changes the order of sums); each setting is reproducible bit for bit.
        reference_threads: torch threads of that background thread (default half the cores, at least 1);
            the vector env's ``agent_threads`` then says how many the agent should use meanwhile (see
            :func:`lm_gym.decoding.torch_threads`).
        render_mode: ``"ansi"`` (``render()`` returns the text) or ``"human"`` (prints it).

    ## Version History

    * v0: initial version.
    """

    metadata = {"render_modes": ["ansi", "human"], "render_fps": 4}

    def __init__(self, render_mode: str | None = None, **kwargs: Any) -> None:
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            # e.g. stable-baselines3's make_vec_env asks every env for "rgb_array"; a text env has no image
            gym.logger.warn(
                f"TextGen-v0 renders {self.metadata['render_modes']}, not {render_mode!r}: rendering is off"
            )
            render_mode = None
        self.render_mode = render_mode
        self._vec = TextGenVectorEnv(num_envs=1, autoreset_mode=AutoresetMode.DISABLED, **kwargs)
        self.observation_space = self._vec.single_observation_space
        self.action_space = self._vec.single_action_space
        self._ended = False

    # The engine is shared with the vector env (N = 1); these expose its knobs on env.unwrapped.
    @property
    def kl_coef(self) -> float:
        return self._vec.kl_coef

    @kl_coef.setter
    def kl_coef(self, value: float) -> None:
        self._vec.kl_coef = value

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self._vec.tokenizer

    @property
    def reference(self) -> PreTrainedModel:
        return self._vec.reference

    def set_policy_log_prob(self, log_prob: float) -> None:
        """Tell the env ``log pi(a|s)`` of the action passed to the next ``step`` (used once)."""
        self._vec.set_policy_log_probs(np.array([log_prob], dtype=np.float64))

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        super().reset(seed=seed)
        options = dict(options or {})
        if "prompt" in options:
            options["prompts"] = [options.pop("prompt")]
        obs, infos = self._vec.reset(seed=seed, options=options)
        self._np_random = self._vec._rngs[0]  # one generator: the one that picks the prompts
        self._ended = False
        return _row(obs, 0), _row_info(infos, 0)

    def step(self, action: int) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        if self._ended:
            raise RuntimeError("step() called after the episode ended; call reset() first")
        if isinstance(action, (bool, np.bool_)) or not self.action_space.contains(action):
            raise ValueError(
                f"action must be an integer token id in [0, {self.action_space.n}); got {action!r} "
                f"of type {type(action).__name__}"
            )
        obs, rewards, terminated, truncated, infos = self._vec.step(np.array([action], dtype=np.int64))
        self._ended = bool(terminated[0] or truncated[0])
        if self.render_mode == "human":
            self.render()
        return _row(obs, 0), float(rewards[0]), bool(terminated[0]), bool(truncated[0]), _row_info(infos, 0)

    def render(self) -> str | None:
        text = self._vec.render()[0]
        if self.render_mode == "human":
            print(text)
            return None
        return text

    def close(self) -> None:
        self._vec.close()
