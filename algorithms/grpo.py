"""GRPO (Shao et al. 2024, DeepSeekMath, section 4.1), with the fixes people use, for language models.

G texts per prompt; each text's advantage is its reward standardised within its group (eq. 3's outcome
supervision, section 4.1.2), the same for all its tokens; the loss is the clipped surrogate with the KL to the
reference in the loss (k3, eq. 4). The fixes are settings of the shared critic-free core
(:class:`~algorithms.common.critic_free.CriticFreeAlgorithm`) and of ``scale`` here:

* Dr. GRPO (Liu et al. 2025): ``scale="none"`` and ``aggregation="dr_grpo"``.
* DAPO (Yu et al. 2025): ``eps_high=0.28``, ``dynamic_sampling=True``, ``aggregation="dapo"``,
  ``mask_truncated=True``, ``kl_coef=0``.
* GSPO (Zheng et al. 2025): ``importance="sequence"`` (with clip ranges of order 3e-4).

Defaults are the paper's GRPO (group std, per-text token means, k3 in the loss) with TRL's eps 0.2 and
std epsilon 1e-4; beta is the core's 0.05 (TRL's GRPO takes 0 by default, the paper 0.04).
"""

from __future__ import annotations

import torch

from algorithms.common.critic_free import CriticFreeAlgorithm, GroupBatch
from algorithms.common.group import group_advantages
from algorithms.common.trainer import check_arg
from algorithms.policy import LMActorCriticPolicy

__all__ = ["GRPO"]


class GRPO(CriticFreeAlgorithm):
    """Group relative policy optimisation on TextGen-v1.

    Args:
        policy: the actor to train.
        scale: what each group's centred reward is divided by: ``"group"`` (its group's std, GRPO), ``"batch"``
            (the std of the whole rollout, TRL's ``scale_rewards="batch"``) or ``"none"`` (Dr. GRPO).
        **kwargs: the settings of :class:`~algorithms.common.critic_free.CriticFreeAlgorithm` (group size,
            clipping, aggregation, KL placement, dynamic sampling) and of the on-policy core.
    """

    def __init__(self, policy: LMActorCriticPolicy, *, scale: str = "group", **kwargs) -> None:
        check_arg("scale", scale, lambda v: v in ("group", "batch", "none"), "'group', 'batch' or 'none'")
        self.scale = scale
        super().__init__(policy, **kwargs)

    def advantages(self, batch: GroupBatch) -> torch.Tensor:
        # A_i = (r_i - mean(r)) / (std(r) + eps) within each group (Shao et al. 2024, section 4.1.2)
        return group_advantages(
            batch.rewards, batch.group_size, self.scale, all_sum=self.process_group.all_sum
        )
