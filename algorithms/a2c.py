"""A2C: synchronous advantage actor-critic (Mnih et al. 2016), for language models.

One gradient step per rollout on

    L = -mean(log pi(a_t|s_t) * A_t) + vf_coef * mean((V(s_t) - R_t)^2) - ent_coef * mean(H[pi(.|s_t)])

with GAE advantages from the shared core. DeepMind tuned Gopher with A2C in the RLHF setting. What
differs from PPO: no ratio and no clipping (the data is used once, by the policy that collected it), so
the policy-gradient term is the plain score-function estimator. The rollout is processed in chunks of
``batch_size`` sequences whose gradients are accumulated: the chunk size bounds memory and changes
nothing in the step.

Defaults: SB3's A2C (vf_coef 0.5, ent_coef 0, max_grad_norm 0.5), except that advantages are whitened
per rollout (as for PPO here; SB3 leaves them raw) and the optimizer is the core's AdamW (SB3 uses
RMSprop), which is what LM fine-tuning uses everywhere.
"""

from __future__ import annotations

import numpy as np
import torch

from algorithms.common.on_policy import OnPolicyAlgorithm
from algorithms.common.trainer import check_arg
from algorithms.policy import LMActorCriticPolicy

__all__ = ["A2C"]


class A2C(OnPolicyAlgorithm):
    """Advantage actor-critic on TextGen-v1: one step per rollout.

    Args:
        policy: the actor-critic to train.
        batch_size: episode segments per forward pass when accumulating the one gradient (memory only).
        vf_coef: weight of the value loss (0.5, SB3).
        ent_coef: weight of the entropy bonus (0.0, SB3).
        **kwargs: the shared settings of :class:`~algorithms.common.on_policy.OnPolicyAlgorithm`.
    """

    def __init__(
        self,
        policy: LMActorCriticPolicy,
        *,
        batch_size: int = 8,
        vf_coef: float = 0.5,
        ent_coef: float = 0.0,
        **kwargs,
    ) -> None:
        check_arg("batch_size", batch_size, lambda v: int(v) == v and v >= 1, "an integer >= 1")
        check_arg("vf_coef", vf_coef, lambda v: v >= 0, ">= 0")
        check_arg("ent_coef", ent_coef, lambda v: v >= 0, ">= 0")
        super().__init__(policy, **kwargs)
        self.batch_size, self.vf_coef, self.ent_coef = batch_size, vf_coef, ent_coef

    def train(self) -> None:
        buffer, policy = self.buffer, self.policy
        if self.normalize_advantage:
            buffer.whiten_advantages()
        rng = np.random.default_rng(self._iteration_seed(self.iteration))
        total_actions = buffer.n_steps * buffer.n_envs
        pg_loss = value_loss = entropy_sum = 0.0
        self.zero_grad()
        finite = True
        for batch in buffer.minibatches(self.batch_size, rng, policy.device, policy.tokenizer.pad_token_id):
            log_prob, entropy, values = policy.evaluate_actions(batch, entropy_grad=self.ent_coef > 0)  # (M,)
            # sums over this chunk's actions; divided by all actions of the rollout, they add up to the means
            chunk_pg = -(batch.advantages * log_prob).sum()
            chunk_value = ((batch.returns - values) ** 2).sum()
            chunk_entropy = entropy.sum()
            loss = (chunk_pg + self.vf_coef * chunk_value - self.ent_coef * chunk_entropy) / total_actions
            if not torch.isfinite(loss):
                finite = False
                break
            loss.backward()
            pg_loss += chunk_pg.item() / total_actions
            value_loss += chunk_value.item() / total_actions
            entropy_sum += chunk_entropy.item()
        self.step_optimizer(finite)  # with several processes, every one steps (or skips) together

        log = self.logger.record
        log("train/policy_loss", pg_loss)
        log("train/value_loss", value_loss)
        log("train/entropy", entropy_sum / total_actions)
        log("train/explained_variance", buffer.explained_variance())
        log("train/skipped_updates", self._skipped_updates)
