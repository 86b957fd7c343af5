"""Rollout storage for LM episodes: per-step arrays, GAE, and whole-sequence minibatches."""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch

from algorithms.common.distributed import ProcessGroup
from lm_gym.kinds import CAUSAL, ModelKind

__all__ = ["RolloutBuffer", "SequenceBatch", "compute_gae"]


def compute_gae(
    rewards: np.ndarray,
    values: np.ndarray,
    dones: np.ndarray,
    last_values: np.ndarray,
    gamma: float,
    lam: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Generalized advantage estimation (Schulman et al. 2016, eq. 16), over (T, N) arrays.

    ``dones[t]`` marks that the episode ended with the action of step ``t`` (nothing to bootstrap);
    ``last_values`` (N,) bootstraps the rows still running after the last step.

    Returns:
        advantages, returns (= advantages + values), both (T, N).
    """
    steps = rewards.shape[0]
    advantages = np.zeros_like(rewards, dtype=np.float64)
    last_gae = np.zeros(rewards.shape[1], dtype=np.float64)
    for t in reversed(range(steps)):
        next_values = last_values if t == steps - 1 else values[t + 1]
        not_done = 1.0 - dones[t]
        delta = rewards[t] + gamma * next_values * not_done - values[t]
        last_gae = delta + gamma * lam * not_done * last_gae
        advantages[t] = last_gae
    return advantages, advantages + values


class SequenceBatch(NamedTuple):
    """A minibatch of episode segments, each one teacher-forced sequence; per-action arrays are (M,).

    :meth:`~algorithms.policy.LMActorCriticPolicy.evaluate_actions` takes it whole. The sequences are laid out
    by the policy's kind (:meth:`lm_gym.kinds.ModelKind.sequences`): for a causal policy, left-padded; for an
    encoder-decoder policy ``input_ids``/``attention_mask`` are the sources (B, S) and the sequences are
    ``decoder_input_ids``/``decoder_attention_mask`` (B, D), the start token and every action, both
    right-padded, and ``action_mask`` is (B, D), over the decoder sequences.
    """

    input_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, L)
    action_mask: torch.Tensor  # (B, L) 1 on the tokens that were actions
    old_log_prob: torch.Tensor  # (M,)
    old_values: torch.Tensor  # (M,)
    advantages: torch.Tensor  # (M,)
    returns: torch.Tensor  # (M,)
    action_masks: torch.Tensor | None = None  # (M, V) bool, the tokens allowed at each action (NLPO), or None
    decoder_input_ids: torch.Tensor | None = None  # (B, D) encoder-decoder policies only
    decoder_attention_mask: torch.Tensor | None = None  # (B, D)
    # (M,) the reference's log-probs (the critic-free methods' KL in the loss), or None
    ref_log_prob: torch.Tensor | None = None


class RolloutBuffer:
    """What ``n_steps`` steps of ``n_envs`` TextGen environments produced.

    Args:
        n_steps: T, steps per rollout.
        n_envs: N, environments (of this process).
        obs_len: the width of the observation arrays in HF layout (the observation space's last axis: an
            encoder-decoder's source and decoder prefix are each that wide).
        process_group: the data-parallel processes whose buffers make one rollout: whitening uses the
            statistics of all of them, and every process yields the same number of minibatches (None: alone).
        kind: the policy's kind of LM (:mod:`lm_gym.kinds`), which decides the observation arrays and the
            teacher-forced sequences.
    """

    def __init__(
        self,
        n_steps: int,
        n_envs: int,
        obs_len: int,
        process_group: ProcessGroup | None = None,
        *,
        kind: ModelKind = CAUSAL,
    ) -> None:
        self.n_steps, self.n_envs = n_steps, n_envs
        self.process_group = process_group
        self.kind = kind
        # the observations in HF layout: input_ids, attention_mask (and an encoder-decoder's decoder_*)
        self.observations = {
            key: np.zeros((n_steps, n_envs, obs_len), dtype=np.int64) for key in kind.hf_keys
        }  # (T, N, L) each
        self.actions = np.zeros((n_steps, n_envs), dtype=np.int64)  # (T, N)
        self.log_probs = np.zeros((n_steps, n_envs))
        self.values = np.zeros((n_steps, n_envs))
        self.rewards = np.zeros((n_steps, n_envs))
        self.dones = np.zeros((n_steps, n_envs))
        self.advantages = np.zeros((n_steps, n_envs))
        self.returns = np.zeros((n_steps, n_envs))
        self.action_masks: np.ndarray | None = None  # (T, N, V) bool, allocated by the first add() with masks
        # (T, N) the reference's log-probs, when an algorithm sets them (the critic-free methods' KL in the loss)
        self.ref_log_probs: np.ndarray | None = None

    def add(
        self,
        t: int,
        obs: dict,
        actions,
        log_probs,
        values,
        rewards,
        dones,
        action_masks=None,
        columns: slice = slice(None),
    ) -> None:
        """Store step ``t``: the observation the actions were taken in, and what followed.

        ``action_masks`` (N, V) bool, optional: the tokens the actions were allowed among (NLPO's masks);
        ``log_probs`` are then those of the masked law. ``columns``: where the N rows go (default every column;
        the critic-free methods' rounds of dynamic sampling fill one block of columns each).
        """
        for key, array in self.observations.items():
            array[t, columns] = obs[key]
        self.actions[t, columns] = _np(actions)
        self.log_probs[t, columns], self.values[t, columns] = _np(log_probs), _np(values)
        self.rewards[t, columns], self.dones[t, columns] = rewards, dones
        if action_masks is not None:
            masks = _np(action_masks)
            if self.action_masks is None:
                self.action_masks = np.zeros((self.n_steps, self.n_envs, masks.shape[-1]), dtype=bool)
            self.action_masks[t, columns] = masks

    def compute_returns_and_advantage(self, last_values: np.ndarray, gamma: float, lam: float) -> None:
        self.advantages, self.returns = compute_gae(
            self.rewards, self.values, self.dones, last_values, gamma, lam
        )

    def whiten_advantages(self) -> None:
        """Advantages to mean 0, std 1 over the rollout of all processes (TRL, SB3)."""
        if self.process_group is None:
            mean, std = self.advantages.mean(), self.advantages.std()
        else:
            mean, std = self.process_group.mean_std(self.advantages)
        self.advantages = (self.advantages - mean) / (std + 1e-8)

    def explained_variance(self) -> float:
        """``1 - Var(returns - values) / Var(returns)``: 1 is a perfect critic, 0 no better than a constant."""
        returns, values = self.returns.ravel(), self.values.ravel()
        var = np.var(returns)
        return float(1 - np.var(returns - values) / var) if var > 0 else float("nan")

    def segments(self) -> list[tuple[int, int, int]]:
        """The stretches of one episode in one env: ``(env, first_step, last_step)``, in env order."""
        out = []
        for env in range(self.n_envs):
            start = 0
            for t in range(self.n_steps):
                if self.dones[t, env] or t == self.n_steps - 1:
                    out.append((env, start, t))
                    start = t + 1
        return out

    def minibatches(
        self, batch_size: int, rng: np.random.Generator, device: torch.device, pad_token_id: int
    ) -> Iterator[SequenceBatch]:
        """Shuffled minibatches of ``batch_size`` segments, each one teacher-forced sequence.

        With several processes each one yields as many minibatches as the process that needs the most, so
        that all take the same optimizer steps together: its segments spread evenly over them, some repeated
        if it has fewer segments than minibatches.
        """
        segments = self.segments()
        for chunk in self.chunks(len(segments), batch_size, rng):
            yield self.batch([segments[i] for i in chunk], device, pad_token_id)

    def chunks(self, n_items: int, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
        """A shuffled split of ``range(n_items)`` into minibatches of ``batch_size`` indices. With several
        processes each one gets as many minibatches as the process that needs the most, so that all take the
        same optimizer steps together: its items spread evenly over them, some repeated if it has fewer items
        than minibatches."""
        order = rng.permutation(n_items)
        if self.process_group is None or not self.process_group.distributed:
            return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
        n_batches = self.process_group.max(-(-len(order) // batch_size))
        return np.array_split(np.resize(order, max(n_batches, len(order))), n_batches)

    def batch(
        self, segments: list[tuple[int, int, int]], device: torch.device, pad_token_id: int
    ) -> SequenceBatch:
        """The ``(env, first_step, last_step)`` segments as one :class:`SequenceBatch` of teacher-forced
        sequences on ``device``."""
        # A segment's last observation holds its whole prefix; with its last action, the whole sequence.
        last_obs = {
            key: np.stack([a[last, env] for env, _, last in segments]) for key, a in self.observations.items()
        }
        last_actions = np.array([self.actions[last, env] for env, _, last in segments])
        n_actions = [last - first + 1 for _, first, last in segments]
        sequences = self.kind.sequences(last_obs, last_actions, n_actions, pad_token_id)  # (B, L) each
        # per-action arrays in action_mask.nonzero() order: row by row, steps in order
        pick = lambda a: np.concatenate([a[first : last + 1, env] for env, first, last in segments])  # noqa: E731
        tensor = lambda a, dt=torch.float32: torch.as_tensor(a, dtype=dt, device=device)  # noqa: E731
        return SequenceBatch(
            **{key: tensor(a, torch.long) for key, a in sequences.items()},
            old_log_prob=tensor(pick(self.log_probs)),
            old_values=tensor(pick(self.values)),
            advantages=tensor(pick(self.advantages)),
            returns=tensor(pick(self.returns)),
            action_masks=None if self.action_masks is None else tensor(pick(self.action_masks), torch.bool),
            ref_log_prob=None if self.ref_log_probs is None else tensor(pick(self.ref_log_probs)),
        )


def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
