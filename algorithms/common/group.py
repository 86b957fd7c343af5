"""The critic-free group methods as pure tensor functions: advantage estimators, the KL term and the loss.

Rows come in groups: ``G = group_size`` consecutive rows of a batch of ``B`` share one prompt (issue 17), so
``scores.view(B // G, G)`` holds one prompt's completions per row. Nothing here touches a model or an env;
GRPO, RLOO and REINFORCE++ (``algorithms/``) call these on their rollouts.

Where a choice exists we follow TRL 1.16's ``GRPOTrainer`` (``_compute_loss``, ``_generate_and_score_completions``)
for GRPO and its fixes, OpenRLHF's ``experience_maker.py`` for REINFORCE++ (its author's code), and say so at
each function.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch

from lm_gym.kl import KLEstimator, kl_estimate

__all__ = [
    "group_advantages",
    "kl_penalty",
    "policy_loss",
    "reinforce_pp_advantages",
    "rloo_advantages",
    "zero_std_groups",
]

Scale = Literal["group", "batch", "none"]
Aggregation = Literal["grpo", "dr_grpo", "dapo"]
Importance = Literal["token", "sequence"]
# Sums a tensor over the data-parallel processes (ProcessGroup.all_sum); None: this process's batch is the batch.
AllSum = Callable[[torch.Tensor], torch.Tensor] | None


def _groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """``scores`` (B,) viewed as (B // G, G), after checking the arguments."""
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D (B,); got shape {tuple(scores.shape)}")
    if group_size < 1 or scores.numel() % group_size != 0:
        raise ValueError(f"group_size must be >= 1 and divide the batch ({scores.numel()}); got {group_size}")
    return scores.view(-1, group_size)  # (B/G, G)


def group_advantages(
    scores: torch.Tensor, group_size: int, scale: Scale = "group", eps: float = 1e-4, all_sum: AllSum = None
) -> torch.Tensor:
    """GRPO's outcome advantage (Shao et al. 2024, section 4.1.2): ``A_i = (r_i - mean(r)) / (std(r) + eps)``
    within each group, the same for every token of completion ``i``.

    The std is the *unbiased* one (Bessel's correction, ``1/(G-1)``), as TRL's ``nanstd`` and verl's
    ``torch.std`` compute it; with G = 1 the advantage is 0. ``eps = 1e-4`` is TRL's.

    Args:
        scores: (B,) one reward per completion, groups of ``group_size`` consecutive rows.
        group_size: completions per prompt ``G``.
        scale: ``"group"`` divides by each group's std (GRPO); ``"batch"`` by the std of all B rewards, the
            mean staying the group's (TRL's ``scale_rewards="batch"``); ``"none"`` does not divide (Dr. GRPO,
            Liu et al. 2025, section 3.1: the std division weights easy and hard prompts unequally).
        eps: added to the std before dividing.
        all_sum: with ``scale="batch"`` and several processes, sums a tensor over them, so that the batch std
            is over every process's rewards (groups never span processes).

    Returns:
        (B,) advantages.
    """
    grouped = _groups(scores, group_size)  # (B/G, G)
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"scale must be 'group', 'batch' or 'none'; got {scale!r}")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be finite and >= 0; got {eps}")
    centred = grouped - grouped.mean(dim=1, keepdim=True)  # (B/G, G)
    if scale == "none":
        return centred.reshape(-1)
    if scale == "group":
        std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(grouped)  # (B/G, 1)
    else:
        std = _std(scores, torch.ones_like(scores), all_sum, unbiased=True)  # ()
    return (centred / (std + eps)).reshape(-1)


def _std(x: torch.Tensor, mask: torch.Tensor, all_sum: AllSum, unbiased: bool) -> torch.Tensor:
    """The std of ``x`` where ``mask`` is 1, over every process's ``x`` when ``all_sum`` is given (two passes,
    as ``torch.std``: no cancellation); 0 for fewer than two values with ``unbiased``."""
    total = (lambda t: t) if all_sum is None else all_sum
    n = total(mask.sum().double())
    mean = total((x * mask).sum().double()) / n.clamp(min=1.0)
    squares = total((((x - mean) ** 2) * mask).sum().double())
    dof = n - 1 if unbiased else n
    var = squares / dof if dof > 0 else torch.zeros((), dtype=torch.float64)
    return var.sqrt().to(x.dtype)


def rloo_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE leave-one-out (Ahmadian et al. 2024, section 3; Kool et al. 2019): the baseline of completion
    ``i`` is the mean of the *other* ``G - 1`` rewards of its group,
    ``A_i = r_i - mean_{j != i} r_j = G / (G - 1) * (r_i - mean(r))`` (verl's ``compute_rloo_outcome_advantage``).

    Args:
        scores: (B,) one reward per completion, groups of ``group_size`` consecutive rows.
        group_size: completions per prompt ``G``, at least 2.

    Returns:
        (B,) advantages.
    """
    grouped = _groups(scores, group_size)  # (B/G, G)
    if group_size < 2:
        raise ValueError(f"rloo needs group_size >= 2 (a leave-one-out baseline); got {group_size}")
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)  # (B/G, G)
    return (grouped - baseline).reshape(-1)


def reinforce_pp_advantages(
    token_rewards: torch.Tensor,
    mask: torch.Tensor,
    *,
    baseline: bool = False,
    group_size: int = 1,
    scores: torch.Tensor | None = None,
    all_sum: AllSum = None,
) -> torch.Tensor:
    """REINFORCE++ (Hu 2025, section 3): returns-to-go with gamma 1 over each row's valid tokens, then
    normalised by the mean and std of all valid tokens of the batch (global, not per group).

    The std is the biased one (``1/N``), floored at ``1e-8`` before the square root, as in OpenRLHF's
    ``experience_maker.py`` (Hu's code; verl's ``masked_whiten`` uses the unbiased variance).

    The ``baseline`` variant (REINFORCE++-baseline; OpenRLHF ``advantage_estimator="reinforce_baseline"``)
    first subtracts each group's mean *outcome* score from the outcome reward, which sits at the last token,
    so every return-to-go of the row moves by that mean. OpenRLHF takes the mean of the outcome rewards
    alone, before the per-token KL is added: pass them as ``scores`` when ``token_rewards`` carry a KL term;
    without ``scores`` the row sums of ``token_rewards`` are used (identical when the rewards are outcome
    only). verl's ``compute_reinforce_plus_plus_baseline_outcome_advantage`` instead puts the centred row
    sum on every token, with no return-to-go.

    Args:
        token_rewards: (B, T) per-token rewards (KL penalty per token, outcome reward at the last valid token).
        mask: (B, T) 1 on the completion's valid tokens, 0 on padding.
        baseline: subtract the group mean of the scores first.
        group_size: completions per prompt ``G`` (used by ``baseline``).
        scores: (B,) the outcome rewards for the baseline (default: the row sums of ``token_rewards``).
        all_sum: with several processes, sums a tensor over them, so that the mean and std are over every
            process's tokens (the "global" of the normalisation).

    Returns:
        (B, T) advantages, 0 on padding.
    """
    if token_rewards.dim() != 2 or mask.shape != token_rewards.shape:
        raise ValueError(
            f"token_rewards and mask must both be (B, T); got {tuple(token_rewards.shape)} and {tuple(mask.shape)}"
        )
    mask = mask.to(token_rewards.dtype)  # (B, T)
    rewards = token_rewards * mask  # (B, T)
    returns = rewards.flip(-1).cumsum(-1).flip(-1)  # (B, T): sum_{s >= t} r_s, gamma = 1
    if baseline:
        if scores is None:
            scores = rewards.sum(-1)  # (B,)
        grouped = _groups(scores, group_size)  # (B/G, G)
        group_mean = grouped.mean(dim=1, keepdim=True).expand_as(grouped).reshape(-1)  # (B,)
        returns = returns - group_mean[:, None]
    elif scores is not None:
        raise ValueError("scores is used only by the baseline variant; pass baseline=True or drop scores")
    total = (lambda t: t) if all_sum is None else all_sum
    n = total(mask.sum().double()).clamp(min=1.0)
    mean = (total((returns * mask).sum().double()) / n).to(returns.dtype)
    var = (total((((returns - mean) ** 2) * mask).sum().double()) / n).to(returns.dtype)
    return (returns - mean) * var.clamp(min=1e-8).rsqrt() * mask


def zero_std_groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """Groups whose rewards are all equal: their GRPO/RLOO advantages are all 0, so they carry no gradient;
    DAPO's dynamic sampling (Yu et al. 2025, section 3.2) drops them and refills the batch.

    Args:
        scores: (B,) one reward per completion, groups of ``group_size`` consecutive rows.
        group_size: completions per prompt ``G``.

    Returns:
        (B // G,) bool, True for the constant groups.
    """
    grouped = _groups(scores, group_size)  # (B/G, G)
    return grouped.amax(dim=1) == grouped.amin(dim=1)


def kl_penalty(
    log_prob: torch.Tensor, ref_log_prob: torch.Tensor, estimator: KLEstimator = "k3"
) -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate for a loss term (Schulman 2020), on tokens sampled from pi.

    With ``log rho = ref_log_prob - log_prob``: ``k1 = -log rho``, ``k2 = (log rho)^2 / 2``,
    ``k3 = (rho - 1) - log rho`` (:func:`lm_gym.kl.kl_estimate`).

    Values: k1 and k3 are unbiased for KL(pi || pi_ref) (k3 never negative, lower variance); k2 is biased.
    Gradients, differentiated inside the loss through ``log_prob`` with on-policy samples held fixed:
    ``E[grad k1] = 0`` (no pull towards the reference at all), ``E[grad k2] = grad KL(pi || pi_ref)``, and
    ``E[grad k3] = grad KL(pi_ref || pi)``, the other direction. GRPO (Shao et al. 2024, eq. 4) uses k3 in
    the loss; TRL does too. Only k1 used as a per-token *reward* gives grad KL(pi || pi_ref)
    (see :mod:`lm_gym.kl`).

    Args:
        log_prob: (...) log pi of the sampled tokens, with gradient.
        ref_log_prob: (...) log pi_ref of the same tokens.
        estimator: ``"k1"``, ``"k2"`` or ``"k3"``.

    Returns:
        (...) per-token estimates, same shape.
    """
    if log_prob.shape != ref_log_prob.shape:
        raise ValueError(
            f"log_prob and ref_log_prob must have one shape; got {tuple(log_prob.shape)} and "
            f"{tuple(ref_log_prob.shape)}"
        )
    return kl_estimate(log_prob, ref_log_prob, estimator)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    return float((x * mask).sum() / mask.sum().clamp(min=1.0))


def policy_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    aggregation: Aggregation = "grpo",
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    importance: Importance = "token",
    max_tokens: int | None = None,
    kl: torch.Tensor | None = None,
    beta: float = 0.0,
    num_sequences: float | None = None,
    num_tokens: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The clipped surrogate of PPO (Schulman et al. 2017, eq. 7) as the group methods aggregate it.

    Per token, with ``r = pi / pi_old``: ``l = -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) + beta * kl``
    (the KL added per token before aggregating, as TRL does). ``eps_high > eps_low`` is DAPO's clip-higher
    (Yu et al. 2025, section 3.1; 0.2 / 0.28 there). Aggregations over the (B, T) valid tokens
    ``m``, following TRL 1.16's ``loss_type`` of the same name:

    * ``grpo``: ``mean_i (sum_t l m / sum_t m)``, each sequence's token mean then the mean over sequences
      (Shao et al. 2024, eq. 3; the ``1/|o_i|`` that biases length).
    * ``dapo``: ``sum l m / sum m``, one mean over every token of the batch (Yu et al. 2025, section 3.3).
    * ``dr_grpo``: ``sum l m / (B * max_tokens)``, a constant normaliser (Liu et al. 2025, section 3.1).
      ``max_tokens`` is TRL's ``max_completion_length``; left ``None`` it is ``T``, verl's choice
      (``loss_agg_mode="seq-mean-token-sum-norm"``).

    When one optimizer step accumulates the gradients of several calls (micro-batches) and averages them over
    processes, ``num_sequences`` / ``num_tokens`` replace this call's own ``B`` / ``sum m``: pass the counts
    of the whole step over every process divided by the number of processes. The averaged gradient is then the
    whole step's aggregate, as TRL divides by the token count of the whole batch over processes and
    accumulation steps.

    ``importance="sequence"`` is GSPO (Zheng et al. 2025, section 4: the GSPO objective and its ``s_i``): one ratio per sequence,
    ``s_i = exp(mean_t log r_t)``, the geometric mean of the token ratios (``(pi(o|q)/pi_old(o|q))^(1/|o|)``),
    clipped per sequence, its gradient flowing through the mean of the log-ratios (as TRL's
    ``importance_sampling_level="sequence"``).

    Args:
        log_prob: (B, T) log pi of the sampled tokens, with gradient.
        old_log_prob: (B, T) log pi_old of the same tokens, from the rollout.
        advantages: (B,) one per sequence, or (B, T) per token.
        mask: (B, T) 1 on the valid completion tokens (truncated completions already masked out by the caller).
        aggregation: ``"grpo"``, ``"dr_grpo"`` or ``"dapo"``.
        eps_low: the ratio is clipped below at ``1 - eps_low``.
        eps_high: the ratio is clipped above at ``1 + eps_high``.
        importance: ``"token"`` (PPO/GRPO) or ``"sequence"`` (GSPO).
        max_tokens: dr_grpo's constant normaliser per sequence (default ``T``).
        kl: (B, T) per-token KL term (:func:`kl_penalty`), required when ``beta > 0``.
        beta: the KL coefficient.
        num_sequences: what ``grpo`` and ``dr_grpo`` count as ``B`` (default this batch's rows).
        num_tokens: what ``dapo`` divides by (default this batch's valid tokens).

    Returns:
        The scalar loss and the stats: ``pg_loss`` (the loss without the KL), ``clip_ratio_low`` (fraction
        with ``r < 1 - eps_low`` and ``A < 0``: clipped below), ``clip_ratio_high`` (``r > 1 + eps_high``
        and ``A > 0``), ``clip_ratio`` (either; TRL's ``clip_ratio/region_mean``), ``approx_kl`` (k3 of
        pi_old against pi per token, as PPO logs it), ``kl`` (the KL term's token mean, when given).
        Fractions are over valid tokens, or over sequences with ``importance="sequence"`` and (B,)
        advantages (as TRL).
    """
    if log_prob.dim() != 2 or old_log_prob.shape != log_prob.shape or mask.shape != log_prob.shape:
        raise ValueError(
            f"log_prob, old_log_prob and mask must all be (B, T); got {tuple(log_prob.shape)}, "
            f"{tuple(old_log_prob.shape)} and {tuple(mask.shape)}"
        )
    batch, steps = log_prob.shape
    if advantages.shape not in ((batch,), (batch, steps)):
        raise ValueError(
            f"advantages must be (B,) or (B, T) = {(batch, steps)}; got {tuple(advantages.shape)}"
        )
    if aggregation not in ("grpo", "dr_grpo", "dapo"):
        raise ValueError(f"aggregation must be 'grpo', 'dr_grpo' or 'dapo'; got {aggregation!r}")
    if importance not in ("token", "sequence"):
        raise ValueError(f"importance must be 'token' or 'sequence'; got {importance!r}")
    if not 0 <= eps_low < 1:
        raise ValueError(f"eps_low must be in [0, 1); got {eps_low}")
    if not (math.isfinite(eps_high) and eps_high >= 0):
        raise ValueError(f"eps_high must be finite and >= 0; got {eps_high}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1 (or None for T); got {max_tokens}")
    if not (math.isfinite(beta) and beta >= 0):
        raise ValueError(f"beta must be finite and >= 0; got {beta}")
    if beta > 0 and kl is None:
        raise ValueError("beta > 0 needs the per-token kl term; pass kl= or set beta=0")
    if kl is not None and kl.shape != log_prob.shape:
        raise ValueError(f"kl must be (B, T) = {(batch, steps)}; got {tuple(kl.shape)}")
    for name, count in (("num_sequences", num_sequences), ("num_tokens", num_tokens)):
        if count is not None and not (math.isfinite(count) and count > 0):
            raise ValueError(f"{name} must be a finite count > 0 (or None for this batch's); got {count}")

    mask = mask.to(log_prob.dtype)  # (B, T)
    adv = advantages[:, None] if advantages.dim() == 1 else advantages  # (B, 1) or (B, T)
    log_ratio = log_prob - old_log_prob  # (B, T)
    if importance == "token":
        log_weight = log_ratio  # (B, T)
    else:
        # GSPO (Zheng et al. 2025): log s_i = (1/|o_i|) sum_t log r_t, the gradient flowing through every token's log pi
        log_weight = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0))[:, None]  # (B, 1)
    ratio = torch.exp(log_weight)  # (B, T) or (B, 1)
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    pg_per_token = -torch.min(ratio * adv, clipped * adv).expand(batch, steps)  # (B, T)
    per_token = pg_per_token if kl is None else pg_per_token + beta * kl  # (B, T)

    sequences = batch if num_sequences is None else num_sequences
    tokens = mask.sum().clamp(min=1.0) if num_tokens is None else num_tokens

    def aggregate(x: torch.Tensor) -> torch.Tensor:
        if aggregation == "grpo":
            return ((x * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).sum() / sequences
        if aggregation == "dapo":
            return (x * mask).sum() / tokens
        return (x * mask).sum() / (sequences * (steps if max_tokens is None else max_tokens))

    loss = aggregate(per_token)
    with torch.no_grad():
        low = ((ratio < 1 - eps_low) & (adv < 0)).to(log_prob.dtype)
        high = ((ratio > 1 + eps_high) & (adv > 0)).to(log_prob.dtype)
        if low.shape[1] == 1:  # one ratio and one advantage per sequence: count sequences with tokens
            count_mask = (mask.sum(-1, keepdim=True) > 0).to(log_prob.dtype)  # (B, 1)
        else:
            count_mask = mask
        stats = {
            "pg_loss": float(aggregate(pg_per_token)),
            "clip_ratio_low": _masked_mean(low, count_mask),
            "clip_ratio_high": _masked_mean(high, count_mask),
            "clip_ratio": _masked_mean(torch.maximum(low, high), count_mask),
            "approx_kl": _masked_mean(torch.expm1(log_ratio) - log_ratio, mask),  # k3 (Schulman 2020)
        }
        if kl is not None:
            stats["kl"] = _masked_mean(kl, mask)
    return loss, stats
