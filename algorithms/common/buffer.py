"""Rollout storage for LM episodes: per-step arrays, GAE, and whole-sequence minibatches."""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch

from algorithms.common.distributed import ProcessGroup

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
    """A minibatch of episode segments as left-padded sequences; per-action arrays are (M,).

    For an encoder-decoder policy ``input_ids``/``attention_mask`` are the sources (B, S) and the sequences
    are ``decoder_input_ids``/``decoder_attention_mask`` (B, D), the start token and every action, both
    right-padded; ``action_mask`` is then (B, D), over the decoder sequences.
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


class RolloutBuffer:
    """What ``n_steps`` steps of ``n_envs`` TextGen environments produced.

    Args:
        n_steps: T, steps per rollout.
        n_envs: N, environments (of this process).
        obs_len: length of the observation arrays.
        process_group: the data-parallel processes whose buffers make one rollout: whitening uses the
            statistics of all of them, and every process yields the same number of minibatches (None: alone).
        decoder_len: for an encoder-decoder policy, the length of the decoder observation
            (``decoder_input_ids``), stored beside the source in ``input_ids`` (None: a causal LM).
    """

    def __init__(
        self,
        n_steps: int,
        n_envs: int,
        obs_len: int,
        process_group: ProcessGroup | None = None,
        *,
        decoder_len: int | None = None,
    ) -> None:
        self.n_steps, self.n_envs = n_steps, n_envs
        self.process_group = process_group
        self.input_ids = np.zeros((n_steps, n_envs, obs_len), dtype=np.int64)  # (T, N, L)
        self.attention_mask = np.zeros((n_steps, n_envs, obs_len), dtype=np.int64)
        self.decoder_input_ids = self.decoder_attention_mask = None  # (T, N, D) encoder-decoder only
        if decoder_len is not None:
            self.decoder_input_ids = np.zeros((n_steps, n_envs, decoder_len), dtype=np.int64)
            self.decoder_attention_mask = np.zeros((n_steps, n_envs, decoder_len), dtype=np.int64)
        self.actions = np.zeros((n_steps, n_envs), dtype=np.int64)  # (T, N)
        self.log_probs = np.zeros((n_steps, n_envs))
        self.values = np.zeros((n_steps, n_envs))
        self.rewards = np.zeros((n_steps, n_envs))
        self.dones = np.zeros((n_steps, n_envs))
        self.advantages = np.zeros((n_steps, n_envs))
        self.returns = np.zeros((n_steps, n_envs))
        self.action_masks: np.ndarray | None = None  # (T, N, V) bool, allocated by the first add() with masks

    def add(self, t: int, obs: dict, actions, log_probs, values, rewards, dones, action_masks=None) -> None:
        """Store step ``t``: the observation the actions were taken in, and what followed.

        ``action_masks`` (N, V) bool, optional: the tokens the actions were allowed among (NLPO's masks);
        ``log_probs`` are then those of the masked law.
        """
        self.input_ids[t], self.attention_mask[t] = obs["input_ids"], obs["attention_mask"]
        if self.decoder_input_ids is not None:
            self.decoder_input_ids[t] = obs["decoder_input_ids"]
            self.decoder_attention_mask[t] = obs["decoder_attention_mask"]
        self.actions[t] = _np(actions)
        self.log_probs[t], self.values[t] = _np(log_probs), _np(values)
        self.rewards[t], self.dones[t] = rewards, dones
        if action_masks is not None:
            masks = _np(action_masks)
            if self.action_masks is None:
                self.action_masks = np.zeros((self.n_steps, self.n_envs, masks.shape[-1]), dtype=bool)
            self.action_masks[t] = masks

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
        order = rng.permutation(len(segments))
        if self.process_group is None or not self.process_group.distributed:
            chunks = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
        else:
            n_batches = self.process_group.max(-(-len(order) // batch_size))
            chunks = np.array_split(np.resize(order, max(n_batches, len(order))), n_batches)
        for chunk in chunks:
            yield self._batch([segments[i] for i in chunk], device, pad_token_id)

    def _batch(
        self, segments: list[tuple[int, int, int]], device: torch.device, pad_token_id: int
    ) -> SequenceBatch:
        decoder_ids = decoder_mask = None
        if self.decoder_input_ids is not None:
            ids, mask, action_mask, decoder_ids, decoder_mask = self._seq2seq_arrays(segments, pad_token_id)
        else:
            ids, mask, action_mask = self._arrays(segments, pad_token_id)
        # per-action arrays in action_mask.nonzero() order: row by row, steps in order
        pick = lambda a: np.concatenate([a[first : last + 1, env] for env, first, last in segments])  # noqa: E731
        tensor = lambda a, dt=torch.float32: torch.as_tensor(a, dtype=dt, device=device)  # noqa: E731
        return SequenceBatch(
            tensor(ids, torch.long),
            tensor(mask, torch.long),
            tensor(action_mask, torch.long),
            tensor(pick(self.log_probs)),
            tensor(pick(self.values)),
            tensor(pick(self.advantages)),
            tensor(pick(self.returns)),
            None if self.action_masks is None else tensor(pick(self.action_masks), torch.bool),
            None if decoder_ids is None else tensor(decoder_ids, torch.long),
            None if decoder_mask is None else tensor(decoder_mask, torch.long),
        )

    def _arrays(
        self, segments: list[tuple[int, int, int]], pad_token_id: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """input_ids, attention_mask and action_mask (B, L) of the segments as left-padded sequences."""
        # A segment's last observation holds its whole prefix; append the last action to get the sequence.
        seqs, n_actions = [], []
        for env, first, last in segments:
            obs = self.input_ids[last, env][self.attention_mask[last, env] > 0]
            seqs.append(np.append(obs, self.actions[last, env]))
            n_actions.append(last - first + 1)
        width = max(len(s) for s in seqs)
        ids = np.full((len(seqs), width), pad_token_id, dtype=np.int64)
        mask = np.zeros((len(seqs), width), dtype=np.int64)
        action_mask = np.zeros((len(seqs), width), dtype=np.int64)
        for i, (seq, k) in enumerate(zip(seqs, n_actions)):
            ids[i, width - len(seq) :], mask[i, width - len(seq) :] = seq, 1
            action_mask[i, width - k :] = 1
        return ids, mask, action_mask

    def _seq2seq_arrays(
        self, segments: list[tuple[int, int, int]], pad_token_id: int
    ) -> tuple[np.ndarray, ...]:
        """Encoder-decoder: the sources (B, S), and the decoder sequences (B, D) with their action_mask, all
        right-padded (the layout of teacher forcing; positions are then exact for any decoder)."""
        sources, seqs, n_actions = [], [], []
        for env, first, last in segments:
            sources.append(self.input_ids[last, env][self.attention_mask[last, env] > 0])
            prefix = self.decoder_input_ids[last, env][self.decoder_attention_mask[last, env] > 0]
            seqs.append(np.append(prefix, self.actions[last, env]))
            n_actions.append(last - first + 1)
        ids, mask = _right_pad(sources, pad_token_id)
        decoder_ids, decoder_mask = _right_pad(seqs, pad_token_id)
        action_mask = np.zeros_like(decoder_mask)
        for i, (seq, k) in enumerate(zip(seqs, n_actions)):
            action_mask[i, len(seq) - k : len(seq)] = 1
        return ids, mask, action_mask, decoder_ids, decoder_mask


def _right_pad(rows: list[np.ndarray], pad_token_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token arrays -> (ids, mask), both (B, max length), right-padded."""
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_token_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = row, 1
    return ids, mask


def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
