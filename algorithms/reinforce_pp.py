"""REINFORCE++ (Hu 2025), for language models: REINFORCE with PPO's tricks and no critic.

Per token: the k1 KL penalty in the reward and the score at the last token; the advantage of a token is its
return-to-go (gamma 1), normalised over every token of the batch (global mean and std, not per group, the
paper's section 3); the loss is the clipped surrogate with one mean over every token (OpenRLHF's token-level
loss). The "baseline" variant (REINFORCE++-baseline) first subtracts each prompt's mean score, so it uses
groups (``group_size >= 2``); the plain algorithm needs none (``group_size=1``, one text per prompt).
"""

from __future__ import annotations

import torch

from algorithms.common.critic_free import CriticFreeAlgorithm, GroupBatch
from algorithms.common.group import reinforce_pp_advantages
from algorithms.policy import LMActorCriticPolicy

__all__ = ["REINFORCEPP"]


class REINFORCEPP(CriticFreeAlgorithm):
    """REINFORCE++ on TextGen-v1.

    Args:
        policy: the actor to train.
        baseline: the REINFORCE++-baseline variant: subtract the group's mean score first (needs
            ``group_size >= 2``).
        group_size: texts per prompt (1 for plain REINFORCE++).
        aggregation: the loss's aggregation (``"dapo"``: one mean over every token, as OpenRLHF).
        kl_placement: ``"reward"`` (the paper's: per-token k1 in the reward) or ``"loss"``.
        kl_estimator: the KL's estimator (only k1 in the reward).
        **kwargs: the settings of :class:`~algorithms.common.critic_free.CriticFreeAlgorithm` and of the
            on-policy core.
    """

    def __init__(
        self,
        policy: LMActorCriticPolicy,
        *,
        baseline: bool = False,
        group_size: int = 1,
        aggregation: str = "dapo",
        kl_placement: str = "reward",
        kl_estimator: str = "k1",
        **kwargs,
    ) -> None:
        if baseline and group_size < 2:
            raise ValueError(
                f"baseline=True subtracts each group's mean score: group_size must be >= 2; got {group_size}"
            )
        self.baseline = baseline
        super().__init__(
            policy,
            group_size=group_size,
            aggregation=aggregation,
            kl_placement=kl_placement,
            kl_estimator=kl_estimator,
            **kwargs,
        )

    def advantages(self, batch: GroupBatch) -> torch.Tensor:
        # returns-to-go, globally whitened (Hu 2025, section 3); the baseline variant centres the scores first
        return reinforce_pp_advantages(
            batch.token_rewards,
            batch.mask,
            baseline=self.baseline,
            group_size=batch.group_size,
            scores=batch.scores if self.baseline else None,
            all_sum=self.process_group.all_sum,
        )
