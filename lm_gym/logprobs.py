"""How the policy's log-probabilities reach the environment.

The KL part of the reward needs ``log pi(a_t|s_t)`` of the policy that chose ``a_t``. Only the agent
knows it, and a Gymnasium action is just a token id, so the environment offers two documented channels:

1. **Tell it before stepping** (our algorithms, hand-written loops): ``env.unwrapped.set_policy_log_prob(x)``
   on a single env, ``envs.set_policy_log_probs(array_of_N)`` on the vector env, right before ``step``. The
   value is used for that one step. The agent already computed it when it sampled, so nothing is run twice.
2. **A shared cache** (stable-baselines3, or any code whose rollout loop you do not own): a
   :class:`PolicyLogProbCache` is handed to the environment(s) and to the policy. Whenever the policy
   computes its next-token distribution for a batch of observations it records it; at ``step`` the
   environment looks its own current observation up and reads the log-prob of the action taken, whatever
   action that was. Identical observations give identical distributions, so the lookup is exact even when
   several environments of a ``DummyVecEnv`` hold the same text.

With neither (a random agent, or ``kl_coef=0``), the KL term is left out of the reward and the info
carries no ``policy_log_prob``.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["PolicyLogProbCache"]


def _key(input_ids: np.ndarray, attention_mask: np.ndarray) -> bytes:
    return np.asarray(input_ids, dtype=np.int64)[np.asarray(attention_mask) > 0].tobytes()


class PolicyLogProbCache:
    """The latest batch of next-token log-distributions of a policy, keyed by observation."""

    def __init__(self) -> None:
        self._table: dict[bytes, torch.Tensor] = {}

    def record(
        self,
        input_ids: np.ndarray | torch.Tensor,
        attention_mask: np.ndarray | torch.Tensor,
        log_probs: torch.Tensor,
    ) -> None:
        """Store ``log_probs`` (B, V), the policy's next-token log-distribution for each of B observations."""
        ids = np.asarray(torch.as_tensor(input_ids).detach().cpu().long())  # (B, L)
        mask = np.asarray(torch.as_tensor(attention_mask).detach().cpu().long())  # (B, L)
        log_probs = log_probs.detach()
        self._table = {_key(ids[i], mask[i]): log_probs[i] for i in range(ids.shape[0])}

    def lookup(self, input_ids: np.ndarray, attention_mask: np.ndarray, action: int) -> float | None:
        """``log pi(action | observation)`` if the observation was recorded, else ``None``."""
        row = self._table.get(_key(input_ids, attention_mask))
        return None if row is None else float(row[action])
