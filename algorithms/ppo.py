"""PPO with the clipped surrogate objective (Schulman et al. 2017), for language models.

Defaults follow TRL's PPO and SB3 where they agree with the LM setting (see docs/algorithms.md):
clip 0.2 on the ratio and on the value, 4 epochs, value coefficient 0.1 (TRL; SB3 uses 0.5),
advantages whitened per rollout, gradient norm clipped at 0.5. The value clipping is TRL's and OpenAI
baselines': the larger of the clipped and unclipped squared errors (:func:`clipped_value_loss`).
"""

from __future__ import annotations

import numpy as np
import torch

from algorithms.common.on_policy import OnPolicyAlgorithm
from algorithms.common.trainer import check_arg
from algorithms.policy import LMActorCriticPolicy

__all__ = ["PPO", "clipped_value_loss"]


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip_range_vf: float | None
) -> torch.Tensor:
    """The value loss, ``0.5 * mean((V - R)^2)``, or with ``clip_range_vf`` its pessimistic clipped form
    ``0.5 * mean(max((V - R)^2, (V_clip - R)^2))``, ``V_clip = V_old + clip(V - V_old, -eps_v, eps_v)``
    (OpenAI baselines' ppo2, TRL's PPO, CleanRL's ``clip_vloss``). The max keeps the unclipped error's
    gradient when the value has moved past the clip *away* from the return; the clipped value's loss
    alone (SB3's ``clip_range_vf``) has no gradient there.

    Args:
        values: V, the values being trained (M,).
        old_values: V_old, the values of the rollout (M,).
        returns: R, the GAE returns (M,).
        clip_range_vf: eps_v, or None for the plain squared error.
    """
    v_loss_unclipped = (values - returns) ** 2
    if clip_range_vf is None:
        return 0.5 * v_loss_unclipped.mean()
    v_clipped = old_values + torch.clamp(values - old_values, -clip_range_vf, clip_range_vf)
    v_loss_clipped = (v_clipped - returns) ** 2
    return 0.5 * torch.max(v_loss_unclipped, v_loss_clipped).mean()


class PPO(OnPolicyAlgorithm):
    """Proximal policy optimisation on TextGen-v1.

    Args:
        policy: the actor-critic to train.
        n_epochs: passes over each rollout.
        batch_size: episode segments per minibatch (each is one teacher-forced sequence).
        clip_range: epsilon of the clipped ratio.
        clip_range_vf: clip of the value around the old value; the loss is the larger of the clipped and
            unclipped squared errors (TRL, OpenAI baselines; None = off).
        vf_coef: weight of the value loss.
        ent_coef: weight of the entropy bonus.
        target_kl: stop the epochs early when the approximate KL to the rollout policy exceeds
            ``1.5 * target_kl`` (SB3's rule; None = off). Not to be confused with the KL penalty's
            ``kl_target`` of the reward.
        **kwargs: the shared settings of :class:`~algorithms.common.on_policy.OnPolicyAlgorithm`.
    """

    def __init__(
        self,
        policy: LMActorCriticPolicy,
        *,
        n_epochs: int = 4,
        batch_size: int = 8,
        clip_range: float = 0.2,
        clip_range_vf: float | None = 0.2,
        vf_coef: float = 0.1,
        ent_coef: float = 0.0,
        target_kl: float | None = None,
        **kwargs,
    ) -> None:
        check_arg("n_epochs", n_epochs, lambda v: int(v) == v and v >= 1, "an integer >= 1")
        check_arg("batch_size", batch_size, lambda v: int(v) == v and v >= 1, "an integer >= 1")
        check_arg("clip_range", clip_range, lambda v: 0 < v < 1, "in (0, 1)")
        check_arg("clip_range_vf", clip_range_vf, lambda v: v is None or v > 0, "> 0 or None")
        check_arg("vf_coef", vf_coef, lambda v: v >= 0, ">= 0")
        check_arg("ent_coef", ent_coef, lambda v: v >= 0, ">= 0")
        check_arg("target_kl", target_kl, lambda v: v is None or v > 0, "> 0 or None")
        super().__init__(policy, **kwargs)
        self.n_epochs, self.batch_size = n_epochs, batch_size
        self.clip_range, self.clip_range_vf = clip_range, clip_range_vf
        self.vf_coef, self.ent_coef = vf_coef, ent_coef
        self.ppo_target_kl = target_kl

    def train(self) -> None:
        buffer, policy = self.buffer, self.policy
        if self.normalize_advantage:
            buffer.whiten_advantages()
        rng = np.random.default_rng(self._iteration_seed(self.iteration))
        pg_losses, value_losses, entropies, approx_kls, clip_fractions = [], [], [], [], []
        continue_training = True
        for _epoch in range(self.n_epochs):
            for batch in buffer.minibatches(
                self.batch_size, rng, policy.device, policy.tokenizer.pad_token_id
            ):
                # (M,) each; NLPO's batches carry the action masks, a seq2seq policy's the decoder sequences
                log_prob, entropy, values = policy.evaluate_actions(batch, entropy_grad=self.ent_coef > 0)
                advantages = batch.advantages
                ratio = torch.exp(log_prob - batch.old_log_prob)
                # clipped surrogate objective (Schulman et al. 2017, eq. 7)
                policy_loss = -torch.min(
                    advantages * ratio,
                    advantages * torch.clamp(ratio, 1 - self.clip_range, 1 + self.clip_range),
                ).mean()
                value_loss = clipped_value_loss(values, batch.old_values, batch.returns, self.clip_range_vf)
                entropy_loss = -entropy.mean()
                loss = policy_loss + self.vf_coef * value_loss + self.ent_coef * entropy_loss

                with torch.no_grad():
                    log_ratio = log_prob - batch.old_log_prob
                    approx_kl = ((ratio - 1) - log_ratio).mean().item()  # k3 (Schulman 2020)
                    clip_fractions.append(((ratio - 1).abs() > self.clip_range).float().mean().item())
                pg_losses.append(policy_loss.item())
                value_losses.append(value_loss.item())
                entropies.append(entropy.mean().item())
                approx_kls.append(approx_kl)
                # decided on the mean over the processes, so that all of them stop together
                if (
                    self.ppo_target_kl is not None
                    and float(self.all_reduce_mean(torch.tensor(approx_kl, dtype=torch.float64)))
                    > 1.5 * self.ppo_target_kl
                ):
                    continue_training = False
                    break
                self.apply_gradients(loss)
            if not continue_training:
                break

        log = self.logger.record
        log("train/policy_loss", np.mean(pg_losses))
        log("train/value_loss", np.mean(value_losses))
        log("train/entropy", np.mean(entropies))
        log("train/approx_kl", np.mean(approx_kls))
        log("train/clip_fraction", np.mean(clip_fractions))
        log("train/explained_variance", buffer.explained_variance())
        log("train/skipped_updates", self._skipped_updates)
