"""PPO with the clipped surrogate objective (Schulman et al. 2017), for language models.

Defaults follow TRL's PPO and SB3 where they agree with the LM setting (see docs/algorithms.md):
clip 0.2 on the ratio and on the value, 4 epochs, value coefficient 0.1 (TRL; SB3 uses 0.5),
advantages whitened per rollout, gradient norm clipped at 0.5.
"""

from __future__ import annotations

import numpy as np
import torch

from algorithms.common.on_policy import OnPolicyAlgorithm, _check
from algorithms.policy import LMActorCriticPolicy

__all__ = ["PPO"]


class PPO(OnPolicyAlgorithm):
    """Proximal policy optimisation on TextGen-v0.

    Args:
        policy: the actor-critic to train.
        n_epochs: passes over each rollout.
        batch_size: episode segments per minibatch (each is one teacher-forced sequence).
        clip_range: epsilon of the clipped ratio.
        clip_range_vf: clip of the value update around the old value (None = off).
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
        _check("n_epochs", n_epochs, lambda v: int(v) == v and v >= 1, "an integer >= 1")
        _check("batch_size", batch_size, lambda v: int(v) == v and v >= 1, "an integer >= 1")
        _check("clip_range", clip_range, lambda v: 0 < v < 1, "in (0, 1)")
        _check("clip_range_vf", clip_range_vf, lambda v: v is None or v > 0, "> 0 or None")
        _check("vf_coef", vf_coef, lambda v: v >= 0, ">= 0")
        _check("ent_coef", ent_coef, lambda v: v >= 0, ">= 0")
        _check("target_kl", target_kl, lambda v: v is None or v > 0, "> 0 or None")
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
                log_prob, entropy, values = policy.evaluate_actions(
                    batch.input_ids,
                    batch.attention_mask,
                    batch.action_mask,
                    entropy_grad=self.ent_coef > 0,
                    action_masks=batch.action_masks,  # None unless the rollout stored masks (NLPO)
                    decoder_input_ids=batch.decoder_input_ids,  # None unless the policy is seq2seq
                    decoder_attention_mask=batch.decoder_attention_mask,
                )  # (M,) each
                advantages = batch.advantages
                ratio = torch.exp(log_prob - batch.old_log_prob)
                # clipped surrogate objective (Schulman et al. 2017, eq. 7)
                policy_loss = -torch.min(
                    advantages * ratio,
                    advantages * torch.clamp(ratio, 1 - self.clip_range, 1 + self.clip_range),
                ).mean()
                if self.clip_range_vf is None:
                    values_pred = values
                else:
                    values_pred = batch.old_values + torch.clamp(
                        values - batch.old_values, -self.clip_range_vf, self.clip_range_vf
                    )
                value_loss = 0.5 * ((batch.returns - values_pred) ** 2).mean()
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
