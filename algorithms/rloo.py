"""RLOO: REINFORCE leave-one-out (Ahmadian et al. 2024, section 3; Kool et al. 2019), for language models.

G texts per prompt; each text's baseline is the mean reward of the *other* G - 1 texts of its prompt, an
unbiased baseline that needs no critic: ``A_i = r_i - mean_{j != i} r_j``. The reward is the text's score
minus ``beta`` times its summed k1 KL (the KL in the reward, the paper's and TRL's RLOO choice); the loss is
the clipped surrogate of the shared core, whose settings (clipping, aggregation, epochs) apply as for GRPO.
"""

from __future__ import annotations

import torch

from algorithms.common.critic_free import CriticFreeAlgorithm, GroupBatch
from algorithms.common.group import rloo_advantages
from algorithms.policy import LMActorCriticPolicy

__all__ = ["RLOO"]


class RLOO(CriticFreeAlgorithm):
    """REINFORCE leave-one-out on TextGen-v1.

    Args:
        policy: the actor to train.
        group_size: k, texts per prompt (at least 2: a leave-one-out baseline).
        kl_placement: ``"reward"`` (the paper's: the text's summed k1 KL joins its reward) or ``"loss"``.
        kl_estimator: the KL's estimator (only k1 in the reward).
        **kwargs: the settings of :class:`~algorithms.common.critic_free.CriticFreeAlgorithm` and of the
            on-policy core.
    """

    def __init__(
        self,
        policy: LMActorCriticPolicy,
        *,
        group_size: int = 4,
        kl_placement: str = "reward",
        kl_estimator: str = "k1",
        **kwargs,
    ) -> None:
        if group_size < 2:
            raise ValueError(f"group_size must be >= 2 for RLOO (a leave-one-out baseline); got {group_size}")
        super().__init__(
            policy, group_size=group_size, kl_placement=kl_placement, kl_estimator=kl_estimator, **kwargs
        )

    def advantages(self, batch: GroupBatch) -> torch.Tensor:
        # A_i = r_i - mean_{j != i} r_j (Ahmadian et al. 2024, section 3)
        return rloo_advantages(batch.rewards, batch.group_size)
