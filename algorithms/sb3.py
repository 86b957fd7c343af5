"""stable-baselines3 compatibility: a causal LM as an SB3 ``ActorCriticPolicy``, and the agent's half of the KL.

:class:`LMSB3Policy` lets *unmodified* ``stable_baselines3.PPO``, ``stable_baselines3.A2C`` and
``sb3_contrib.TRPO`` train a causal language model on ``TextGen-v1``::

    import gymnasium as gym, lm_gym
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env
    from algorithms.sb3 import KLRewardCallback, LMSB3Policy
    from lm_gym.models import load_causal_lm

    reference, tok = load_causal_lm("tiny")          # the env's frozen reference
    env = make_vec_env("TextGen-v1", n_envs=2, env_kwargs=dict(  # render_mode: see below
        model=reference, tokenizer=tok, max_new_tokens=16, render_mode=None))
    model = PPO(LMSB3Policy, env, n_steps=16, batch_size=32, policy_kwargs=dict(lm="tiny", tokenizer=tok))
    model.learn(1024, callback=KLRewardCallback())   # the exact KL penalty (see below)

The env pays the reference's half of the KL penalty, ``kl_coef * log pi_ref(a_t|s_t)``, with every step's
reward, whatever the VecEnv (``DummyVecEnv``, ``SubprocVecEnv``, after ``PPO.load``). The agent's half,
``-kl_coef * log pi(a_t|s_t)``, is :class:`KLRewardCallback`'s (exact: it adds it to the rewards SB3 stores,
from the log-probs SB3 sampled with). ``ent_coef=kl_coef`` (SB3's entropy bonus) has the same objective's
value but leaves the entropy out of the return, so with a stop token the policy learns to stop at once
(``docs/environment.md``); without either, SB3 optimises the score minus ``kl_coef`` times the cross-entropy
to the reference (see ``TextGenEnv``'s Rewards). ``VecMonitor`` and ``evaluate_policy`` report the env's own
returns, without the agent's half.

This is the *compatibility* path: SB3 sees one observation at a time, so every call runs the whole
left-padded sequence through the LM (no KV cache), and the rollout buffer stores each state as a full
sequence of token ids. lm-gym's own algorithms (:mod:`algorithms.ppo`) decode KV-cached and score a whole
episode in one teacher-forced pass; they are much faster (``benchmarks/vs_sb3.py``).

Points where SB3's conventions meet the LM setting:

* ``make_vec_env`` asks for ``render_mode="rgb_array"`` unless ``env_kwargs`` has a ``render_mode``;
  ``TextGen-v1`` renders text only, so it warns and turns rendering off. ``render_mode=None`` (or
  ``"ansi"``) in ``env_kwargs`` avoids the warning.
* SB3's rollout buffers store observations in the observation space's dtype (int64 here) since SB3 2.7.1,
  as float32 before (token ids below 2**24 are exact; they are turned back into int64 here). ``VecNormalize``
  must keep the ids: ``norm_obs=False`` (normalised observations
  are refused with that message); ``norm_reward`` is fine without :class:`KLRewardCallback`, which refuses
  it (it would add an unnormalised term to normalised rewards).
* A2C/PPO/TRPO bootstrap the value of the last observation when an episode is *truncated* (SB3 reads
  ``TimeLimit.truncated``). ``TextGen-v1`` never truncates: a text ends, scored, at a stop token or at
  ``max_new_tokens``, and both are reported as ``terminated``, so SB3 adds no ``gamma * V(final text)`` on
  top of the score, and treats the end as terminal, as lm-gym's algorithms do. (A ``TimeLimit`` of your own
  below ``max_new_tokens`` becomes the texts' length limit: they are scored and terminated there.)
* TRPO tells actor from critic parameters by name (``"value" in name``). The head here is ``value_net``;
  an LM whose own parameter names contain ``"value"`` (GPT-NeoX's ``query_key_value``) would be taken
  for critic weights by TRPO. TRPO also differentiates every parameter, so it needs every LM weight to
  require gradients (full fine-tuning; a peft/LoRA model with frozen base weights fails there).
  Its per-parameter loop costs about two backward passes through the LM
  per weight tensor and update, plus double-backward Fisher-vector products (hence ``double_backward``).
"""

from __future__ import annotations

import inspect
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.distributions import CategoricalDistribution
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.type_aliases import PyTorchObs, Schedule
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from algorithms.common.lora import merged
from lm_gym.models import load_causal_lm
from lm_gym.spaces import PAD

__all__ = ["KLRewardCallback", "LMSB3Policy"]


class KLRewardCallback(BaseCallback):
    """The agent's half of ``TextGen-v1``'s KL penalty, for stable-baselines3: ``-kl_coef * log pi(a_t|s_t)``
    added to each step's reward before SB3 stores it, from the log-prob SB3 sampled the action with.

    With the env's half, ``kl_coef * log pi_ref(a_t|s_t)``, the reward SB3 learns from is RLHF's ``score -
    kl_coef * (log pi - log pi_ref)`` per token, exactly (lm-gym's own algorithms do the same). ``kl_coef`` is
    read from the envs (``get_attr``) at the start of each rollout, so a change of the envs' ``kl_coef`` between
    rollouts is followed. Change it with ``venv.env_method("set_wrapper_attr", "kl_coef", beta)``, not
    ``venv.set_attr("kl_coef", beta)``: SB3's ``set_attr`` sets the attribute on the outermost wrapper (the
    ``Monitor``), where the env never reads it but ``get_attr`` finds it, so the two halves would differ.

    Args:
        kl_coef: use this ``beta`` instead of the envs' (it must then equal theirs for the KL to be exact).
        verbose: SB3's verbosity.

    Raises:
        ValueError: (at ``learn``) the envs' ``kl_coef`` differ, or a ``VecNormalize`` normalises rewards.
    """

    def __init__(self, kl_coef: float | None = None, verbose: int = 0) -> None:
        super().__init__(verbose)
        self.kl_coef = kl_coef
        self._beta = 0.0

    def _init_callback(self) -> None:
        from stable_baselines3.common.vec_env import VecNormalize, unwrap_vec_wrapper

        normalize = unwrap_vec_wrapper(self.training_env, VecNormalize)
        if normalize is not None and normalize.norm_reward:
            raise ValueError(
                "KLRewardCallback adds -kl_coef * log pi to the rewards SB3 stores, which VecNormalize("
                "norm_reward=True) has already normalised; use norm_reward=False"
            )

    def _on_rollout_start(self) -> None:
        if self.kl_coef is not None:
            self._beta = float(self.kl_coef)
            return
        betas = set(self.training_env.get_attr("kl_coef"))
        if len(betas) != 1:
            raise ValueError(
                f"the envs' kl_coef differ ({sorted(betas)}); give KLRewardCallback(kl_coef=...)"
            )
        self._beta = float(betas.pop())

    def _on_step(self) -> bool:
        # SB3's collect_rollouts calls this after env.step and before rollout_buffer.add(rewards, log_probs):
        # the rewards array is the one it stores
        log_pi = self.locals["log_probs"].detach().double().cpu().numpy()  # (N,)
        self.locals["rewards"] -= self._beta * log_pi
        return True


class LMSB3Policy(ActorCriticPolicy):
    """A causal LM as a stable-baselines3 actor-critic for ``TextGen-v1``.

    Every call runs the LM over the batch of left-padded observations in one full forward pass
    (``position_ids = cumsum(attention_mask) - 1``, clamped at 0). The actor is SB3's
    ``CategoricalDistribution`` over the vocabulary with the logits at the last position (divided by
    ``temperature``); the critic is a linear head (``value_net``, zero-initialised so that V = 0 at the
    start) on the last layer's hidden state at the last position (``hidden_states[-1][:, -1]``, read
    as the input of the LM's output head, see :meth:`_lm_forward`). Dropout stays off for good (the LM is
    kept in eval mode; SB3's ``set_training_mode`` only flips the bookkeeping flag).

    SB3 builds the optimizer over ``policy.parameters()``: here the LM's trainable weights and the value
    head. Without peft every LM weight is made trainable; a peft model keeps its own choice (the adapters).
    The ``features_extractor`` SB3 insists on building (a parameter-free ``FlattenExtractor`` by default)
    is never called: :meth:`extract_features` returns the token ids and mask. ``net_arch``,
    ``activation_fn`` and ``ortho_init`` have no effect (there is no MLP extractor); gSDE and separate
    feature extractors are refused.

    Saving: ``model.save(path)`` stores the state dict (LM + head, as ``policy.pth``) and, as SB3 does
    for every attribute, a cloudpickle of ``policy_kwargs``. Pass ``lm`` by name and that is just the
    name (recommended). A loaded model passed as ``lm`` is pickled there in full (its weights are stored
    twice), and pickling fails if the model was ever called with ``output_hidden_states=True``
    (transformers 5 then keeps hooks on it that cannot be pickled; this policy never does so).
    :meth:`save_pretrained` exports a plain ``transformers`` folder.

    Args:
        observation_space: the env's ``Box(-1, V - 1, (L,), int64)`` (token ids, -1 as padding).
        action_space: ``Discrete(vocab_size)``.
        lr_schedule: SB3's learning-rate schedule (SB3 passes it).
        lm: the causal LM to fine-tune, or a name for :func:`lm_gym.models.load_causal_lm` (``"tiny"``,
            ``"smollm2-135m"``, a folder, a Hub id). Do not pass the env's reference: it would train too.
        tokenizer: the LM's tokenizer (loaded with ``lm`` when that is a name); used by
            :meth:`save_pretrained`.
        temperature: the logits are divided by it; give the env the same ``temperature``.
        double_backward: run the attention of forward passes that record gradients with PyTorch's math
            SDPA kernel, which (unlike CPU flash attention) has a second derivative: TRPO's Fisher-vector
            products need it. With PPO/A2C, False keeps the fused kernels (faster, less memory on GPU).
        **kwargs: the remaining ``ActorCriticPolicy`` arguments (``optimizer_class``, ``optimizer_kwargs``,
            ... as SB3's algorithms pass them).
    """

    def __init__(
        self,
        observation_space: spaces.Box,
        action_space: spaces.Discrete,
        lr_schedule: Schedule,
        *,
        lm: PreTrainedModel | str,
        tokenizer: PreTrainedTokenizerBase | None = None,
        temperature: float = 1.0,
        double_backward: bool = True,
        **kwargs: Any,
    ) -> None:
        if not (
            isinstance(observation_space, spaces.Box)
            and np.issubdtype(observation_space.dtype, np.integer)
            and len(observation_space.shape) == 1
        ):
            hint = (
                "; encoder-decoder observations (2, W) are for lm-gym's own algorithms"
                if isinstance(observation_space, spaces.Box) and len(observation_space.shape) == 2
                else ""
            )
            raise ValueError(
                f"LMSB3Policy needs TextGen-v1's token observations, an integer Box of shape (L,); got "
                f"{observation_space}{hint}"
            )
        if not isinstance(action_space, spaces.Discrete):
            raise ValueError(f"LMSB3Policy needs a Discrete(vocab_size) action space; got {action_space}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0; got {temperature!r}")
        if kwargs.get("use_sde"):
            raise ValueError("gSDE (use_sde=True) is for continuous actions; the action here is a token id")
        if kwargs.get("share_features_extractor", True) is False:
            raise ValueError(
                "LMSB3Policy has one LM trunk for actor and critic: share_features_extractor=True"
            )
        self.lm_name = lm if isinstance(lm, str) else None
        if isinstance(lm, str):
            lm, loaded_tokenizer = load_causal_lm(lm, device="cpu")  # SB3 moves the policy to its device
            tokenizer = tokenizer if tokenizer is not None else loaded_tokenizer
        vocab = lm.get_output_embeddings().weight.shape[0]
        if action_space.n != vocab:
            raise ValueError(
                f"the LM has {vocab} output logits but the action space is Discrete({action_space.n}); "
                "build the env with the same model/tokenizer"
            )
        self.tokenizer = tokenizer
        self.temperature = float(temperature)
        self.double_backward = double_backward
        base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
        self._logits_to_keep = "logits_to_keep" in inspect.signature(type(base).forward).parameters
        # nn.Module.__init__ has not run yet, so the LM cannot be an attribute: hand it to _build (which
        # ActorCriticPolicy.__init__ calls last) inside a tuple, which Module.__setattr__ does not register.
        self._lm_to_build = (lm,)
        kwargs.setdefault("net_arch", [])
        kwargs.setdefault("ortho_init", False)
        super().__init__(observation_space, action_space, lr_schedule, **kwargs)

    # ------------------------------------------------------------------------------------------ building
    def _build(self, lr_schedule: Schedule) -> None:
        """Register the LM and the value head, and build SB3's optimizer over their trainable parameters.

        Replaces ``ActorCriticPolicy._build``: no MLP extractor, no ``action_net`` (the LM's own head
        gives the logits), no orthogonal init.
        """
        (lm,) = self.__dict__.pop("_lm_to_build")
        lm.eval()  # dropout off for good (RL on LMs trains without it: Ziegler et al. 2019, TRL)
        if not hasattr(lm, "peft_config"):
            lm.requires_grad_(True)  # full fine-tuning (a peft model trains its adapters only)
        self.lm = lm
        hidden = lm.get_input_embeddings().weight.shape[1]
        param = next(lm.parameters())
        self.value_net = nn.Linear(hidden, 1, device=param.device, dtype=torch.float32)
        nn.init.zeros_(self.value_net.weight)  # V = 0 at the start: no random critic noise in the first GAE
        nn.init.zeros_(self.value_net.bias)
        assert isinstance(self.action_dist, CategoricalDistribution)
        params = [p for p in self.parameters() if p.requires_grad]
        self.optimizer = self.optimizer_class(params, lr=lr_schedule(1), **self.optimizer_kwargs)

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.update(
            lm=self.lm_name if self.lm_name is not None else self.lm,
            tokenizer=self.tokenizer,
            temperature=self.temperature,
            double_backward=self.double_backward,
        )
        return data

    def train(self, mode: bool = True) -> LMSB3Policy:
        """Only the bookkeeping flag follows ``mode``; the LM stays in eval mode (no dropout)."""
        super().train(mode)
        self.lm.eval()
        return self

    def set_training_mode(self, mode: bool) -> None:
        """SB3's switch before rollouts (False) and updates (True); dropout stays off either way."""
        self.train(mode)

    # ------------------------------------------------------------------------------------------ the LM
    def extract_features(  # type: ignore[override]
        self, obs: PyTorchObs, features_extractor: Any = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The token ids and attention mask of a batch of observations, as int64 on the policy's device.

        Observations from the env, and from SB3's rollout buffer since SB3 2.7.1, are int64; the buffer of
        older SB3 versions holds float32 (exact for ids below 2**24). Columns that are padding in every row are dropped: the sequences are left-padded, so
        this changes no position id and no logit at the last position, and saves compute.

        Returns:
            input_ids, attention_mask: each (B, L') with L' <= L.

        Raises:
            ValueError: the observations are not token ids (e.g. normalised by ``VecNormalize``).
        """
        obs = obs.to(self.device).reshape(-1, obs.shape[-1])  # (B, L)
        if obs.is_floating_point():
            ids = obs.round()
            if not (bool((ids == obs).all()) and bool((ids >= PAD).all())):
                raise ValueError(
                    "LMSB3Policy: the observations are not token ids (VecNormalize normalises observations "
                    "by default): use VecNormalize(venv, norm_obs=False)"
                )
            obs = ids
        obs = obs.long()
        mask = (obs != PAD).long()  # (B, L)
        ids = obs.clamp(min=0)  # padding read as id 0, never attended to
        start = int(mask.any(0).long().argmax())  # first column holding a token of some row
        return ids[:, start:], mask[:, start:]

    def _lm_forward(self, obs: PyTorchObs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One full forward of the batch.

        Returns:
            logits: (B, V) float32 next-token logits at the last position, divided by the temperature.
            hidden: (B, H) the last layer's hidden state at the last position.
            input_ids, attention_mask: (B, L') the observations as the LM saw them.
        """
        input_ids, attention_mask = self.extract_features(obs)  # (B, L') each
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, L')
        extra = {"logits_to_keep": 1} if self._logits_to_keep else {}
        # The last hidden state is the input of the output head; a pre-hook on the head, present only for this
        # call, catches it. (output_hidden_states=True would give the same tensor, hidden_states[-1], but in
        # transformers 5 it installs output-capturing hooks on the model for good, after which the model
        # cannot be pickled, so model.save() would fail on the policy_kwargs that hold it.)
        captured: list[torch.Tensor] = []
        head = self.lm.get_output_embeddings()
        handle = head.register_forward_pre_hook(lambda _module, args: captured.append(args[0]))
        math_sdpa = self.double_backward and torch.is_grad_enabled()
        try:
            with sdpa_kernel([SDPBackend.MATH]) if math_sdpa else nullcontext():
                out = self.lm(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    position_ids=position_ids,
                    use_cache=False,
                    **extra,
                )
        finally:
            handle.remove()
        if len(captured) != 1:
            raise RuntimeError(
                f"{type(self.lm).__name__} did not call its output embedding module exactly once "
                f"({len(captured)} calls); LMSB3Policy reads the last hidden state there"
            )
        logits = out.logits[:, -1].float() / self.temperature  # (B, V)
        hidden = captured[0][:, -1]  # (B, H), the final-normed last layer's state = hidden_states[-1][:, -1]
        return logits, hidden, input_ids, attention_mask

    def _value(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, 1) V(s) from the (B, H) hidden states."""
        return self.value_net(hidden.to(self.value_net.weight.dtype))

    # ------------------------------------------------------------------------------------------ SB3 API
    def forward(
        self, obs: PyTorchObs, deterministic: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The rollout call: sample actions.

        Returns:
            actions: (B,) token ids.
            values: (B, 1).
            log_prob: (B,) ``log pi(action | obs)``.
        """
        logits, hidden, _, _ = self._lm_forward(obs)
        distribution = self.action_dist.proba_distribution(action_logits=logits)
        actions = distribution.get_actions(deterministic=deterministic)  # (B,)
        log_prob = distribution.log_prob(actions)  # (B,)
        return actions.reshape((-1, *self.action_space.shape)), self._value(hidden), log_prob

    def evaluate_actions(
        self, obs: PyTorchObs, actions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Values (B, 1), log-probs (B,) and entropies (B,) of ``actions`` (B,) under the current policy."""
        logits, hidden, _, _ = self._lm_forward(obs)
        distribution = self.action_dist.proba_distribution(action_logits=logits)
        return self._value(hidden), distribution.log_prob(actions), distribution.entropy()

    def get_distribution(self, obs: PyTorchObs) -> CategoricalDistribution:
        """The next-token distribution of each observation (TRPO's update calls this)."""
        logits, _, _, _ = self._lm_forward(obs)
        return self.action_dist.proba_distribution(action_logits=logits)

    def predict_values(self, obs: PyTorchObs) -> torch.Tensor:
        """(B, 1) the critic's V(s) (SB3 bootstraps the rollout's last observations with it, and a truncated
        episode's, which TextGen-v1 itself never reports)."""
        _, hidden, _, _ = self._lm_forward(obs)
        return self._value(hidden)

    def _predict(self, observation: PyTorchObs, deterministic: bool = False) -> torch.Tensor:
        """``model.predict``'s action (B,)."""
        logits, _, _, _ = self._lm_forward(observation)
        distribution = self.action_dist.proba_distribution(action_logits=logits)
        return distribution.get_actions(deterministic=deterministic)

    # ------------------------------------------------------------------------------------------ export
    def save_pretrained(self, directory: str | Path) -> None:
        """Export a plain ``transformers`` folder (LoRA merged in) plus ``value_head.safetensors``."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        merged(self.lm).save_pretrained(directory, safe_serialization=True)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(directory)
        save_file(
            {k: v.contiguous() for k, v in self.value_net.state_dict().items()},
            directory / "value_head.safetensors",
        )
