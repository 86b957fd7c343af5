"""NLPO: PPO inside a learned top-p action mask (Ramamurthy, Ammanabrolu et al., ICLR 2023, "Is
Reinforcement Learning (Not) for Natural Language Processing?", NLPO section and Algorithm 1).

A masking policy, a copy of the policy refreshed every ``mask_update_every`` iterations, keeps at every
step the smallest set of tokens whose probability reaches ``mask_top_p`` (at least ``min_tokens_to_keep``);
the current policy samples inside that set, renormalized. The masks are stored with the rollout and applied
again when PPO recomputes the log-probs, so the ratio compares two laws over the same kept set. The env's KL
penalty uses the policy's unmasked log-probs. Both policies' laws are their tempered softmax; the policy's
top-k/top-p filter applies after the mask, inside the kept set (so the draw always has tokens to choose
from), and is not part of any log-prob (:mod:`lm_gym.sampling`).

Defaults are the paper's IMDB configuration (RL4LMs
``scripts/training/task_configs/imdb_text_continuation/gpt2_nlpo.yml``: ``top_mask`` 0.9,
``min_tokens_to_keep`` 100, ``target_update_iterations`` 5). Unlike RL4LMs, whose refreshed copy never
reaches the component that builds the masks (masks stay those of the initial model), the masks here come
from the latest refresh.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import LogitsProcessor, TopPLogitsWarper

from algorithms.common.on_policy import AgentStep
from algorithms.common.trainer import check_arg
from algorithms.policy import LMActorCriticPolicy, RolloutAgent
from algorithms.ppo import PPO
from lm_gym.decoding import RowDecoder

__all__ = ["NLPO", "TopPMaskLogitsProcessor"]

MASK_FILE = "mask_policy.safetensors"


class TopPMaskLogitsProcessor(LogitsProcessor):
    """Sets to -inf the scores of every token outside the current action mask.

    :meth:`set_mask` builds the mask from the masking policy's scores (N, V): the smallest set of tokens
    whose probability reaches ``top_p``, and at least ``min_tokens_to_keep`` (the nucleus that
    ``transformers``' :class:`~transformers.TopPLogitsWarper` keeps). Each call then masks the scores of
    the policy being sampled.

    Args:
        top_p: probability mass the kept set must reach under the masking policy, in (0, 1].
        min_tokens_to_keep: the smallest kept set (capped at the vocabulary size).
    """

    def __init__(self, top_p: float = 0.9, min_tokens_to_keep: int = 100) -> None:
        check_arg("top_p", top_p, lambda v: 0 < v <= 1, "in (0, 1]")
        check_arg(
            "min_tokens_to_keep", min_tokens_to_keep, lambda v: int(v) == v and v >= 1, "an integer >= 1"
        )
        self.top_p, self.min_tokens_to_keep = top_p, int(min_tokens_to_keep)
        self.keep: torch.Tensor | None = None  # (N, V) bool, the current mask

    def set_mask(self, mask_scores: torch.Tensor) -> torch.Tensor:
        """Build the mask from the masking policy's scores (N, V) (-inf allowed); hold it and return it."""
        keep_at_least = min(self.min_tokens_to_keep, mask_scores.shape[-1])
        # NaN marks what the warper removes, so that tokens already at -inf still count toward
        # min_tokens_to_keep.
        nucleus = TopPLogitsWarper(self.top_p, filter_value=float("nan"), min_tokens_to_keep=keep_at_least)
        self.keep = ~nucleus(None, mask_scores.float()).isnan()  # (N, V)
        return self.keep

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.keep is None or self.keep.shape != scores.shape:
            raise RuntimeError(f"set_mask() must build a mask of shape {tuple(scores.shape)} first")
        return scores.masked_fill(~self.keep, float("-inf"))


class NLPO(PPO):
    """Natural Language Policy Optimization on TextGen-v1: PPO sampling inside a top-p mask of a delayed copy
    of the policy.

    The masking policy is the actor's trainable weights as they were at the last refresh (with LoRA only the
    adapters: no second copy of the base model), swapped into the model for its forward pass. It is
    refreshed at the start of every iteration whose number is a multiple of ``mask_update_every``, and saved
    with each checkpoint, so a resumed run builds the same masks.

    Logs, besides PPO's metrics, ``rollout/mask_tokens`` (mean size of the kept set) and
    ``rollout/mask_mass`` (mean probability of the kept set under the current policy's unmasked law: what
    the mask leaves). ``rollout/entropy`` is that of the masked law that was sampled.

    Args:
        policy: the actor-critic to train.
        mask_top_p: probability mass the masking policy's kept set must reach (0.9, the paper's IMDB
            ``top_mask``). Named apart from the policy's ``top_p``, which truncates sampling itself.
        min_tokens_to_keep: the smallest kept set (100, the paper's IMDB config), capped at the vocabulary
            size.
        mask_update_every: iterations between refreshes of the masking policy from the current policy (5,
            the paper's IMDB ``target_update_iterations``).
        **kwargs: the settings of :class:`~algorithms.ppo.PPO` and of the shared on-policy core.
    """

    def __init__(
        self,
        policy: LMActorCriticPolicy,
        *,
        mask_top_p: float = 0.9,
        min_tokens_to_keep: int = 100,
        mask_update_every: int = 5,
        **kwargs: Any,
    ) -> None:
        check_arg("mask_top_p", mask_top_p, lambda v: 0 < v <= 1, "in (0, 1]")
        check_arg(
            "min_tokens_to_keep", min_tokens_to_keep, lambda v: int(v) == v and v >= 1, "an integer >= 1"
        )
        check_arg("mask_update_every", mask_update_every, lambda v: int(v) == v and v >= 1, "an integer >= 1")
        vocab = policy.model.config.vocab_size
        if min_tokens_to_keep >= vocab:
            warnings.warn(
                f"min_tokens_to_keep={min_tokens_to_keep} >= the vocabulary ({vocab} tokens): every token is "
                "kept, so NLPO reduces to PPO",
                stacklevel=2,
            )
        super().__init__(policy, **kwargs)
        self.mask_processor = TopPMaskLogitsProcessor(mask_top_p, min_tokens_to_keep)
        self.mask_update_every = int(mask_update_every)
        self._actor_params = {name: p for name, p in policy.model.named_parameters() if p.requires_grad}
        self.mask_weights: dict[str, torch.Tensor] = {}
        self.refresh_mask_policy()
        self._mask_decoder: RowDecoder | None = None
        self._mask_last_actions: torch.Tensor | None = None
        self._kept_tokens: list[float] = []
        self._kept_mass: list[float] = []

    # ------------------------------------------------------------------------------------------ masking policy
    def refresh_mask_policy(self) -> None:
        """Make the masking policy a copy of the current policy (its trainable actor weights)."""
        self.mask_weights = {name: p.detach().clone() for name, p in self._actor_params.items()}

    @contextmanager
    def mask_policy(self) -> Iterator[nn.Module]:
        """The masking policy for the block's duration: ``policy.model`` with the refreshed weights in place.

        The swap re-points each parameter's ``.data`` (no copy, so cheap even for full fine-tuning) and is
        undone on exit. Gradients are off; nothing else may run the policy model meanwhile.
        """
        originals = {name: p.data for name, p in self._actor_params.items()}
        try:
            with torch.no_grad():
                for name, p in self._actor_params.items():
                    p.data = self.mask_weights[name]
                yield self.policy.model
        finally:
            for name, p in self._actor_params.items():
                p.data = originals[name]

    # ------------------------------------------------------------------------------------------ rollouts
    def collect_rollouts(self) -> dict[str, Any]:
        if self.iteration % self.mask_update_every == 0:  # on the iteration count: a resumed run agrees
            self.refresh_mask_policy()
        pad = self.policy.tokenizer.pad_token_id
        self._mask_decoder = self.policy.kind.decoder(self.policy.model, self.n_envs, pad)
        self._mask_last_actions = None
        self._kept_tokens, self._kept_mass = [], []
        rollout = super().collect_rollouts()
        self._mask_decoder = None  # frees its KV cache
        stats = {
            "rollout/mask_tokens": float(np.mean(self._kept_tokens)),
            "rollout/mask_mass": float(np.mean(self._kept_mass)),
        }
        for key, value in stats.items():
            self.logger.record(key, value)
        rollout["stats"].update(stats)
        return rollout

    def _act(self, agent: RolloutAgent, obs: dict[str, np.ndarray]) -> AgentStep:
        # the masking policy follows the observations with its own KV cache, run with its weights
        kind = self.policy.kind
        with self.mask_policy():
            kind.follow(self._mask_decoder, obs, self._mask_last_actions)
        mask_logits = self._mask_decoder.logits  # (N, V)
        last = kind.last_tokens(obs, mask_logits.device)  # (N, 1)
        # the masking policy's law is the policy's law (same temperature) at the older weights
        law = self.policy.law
        keep = self.mask_processor.set_mask(law(last, mask_logits.clone()) if law else mask_logits)  # (N, V)
        actions, log_probs, values, unmasked = agent.act_with_processor(obs, self.mask_processor)
        self._mask_last_actions = actions
        self._kept_tokens.append(float(keep.sum(-1).float().mean()))
        # log pi_masked(a) = log pi(a) - log pi(kept set): the difference is the kept set's mass
        self._kept_mass.append(float(torch.exp(unmasked - log_probs).mean()))
        return AgentStep(actions, log_probs, values, unmasked, keep)

    # ------------------------------------------------------------------------------------------ checkpoints
    def _save_extra_state(self, folder: Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in self.mask_weights.items()}, folder / MASK_FILE)

    def _load_extra_state(self, folder: Path) -> None:
        from safetensors.torch import load_file

        if not (folder / MASK_FILE).exists():
            raise FileNotFoundError(f"checkpoint {folder} has no {MASK_FILE} (not an NLPO run?)")
        weights = load_file(folder / MASK_FILE, device=str(self.policy.device))
        if set(weights) != set(self._actor_params):
            raise ValueError(
                f"{folder / MASK_FILE} does not fit this policy (LoRA vs full, or another model)"
            )
        self.mask_weights = weights
