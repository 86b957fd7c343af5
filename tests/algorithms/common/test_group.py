"""Tests of algorithms.common.group: each estimator and each loss aggregation against a hand computation."""

from __future__ import annotations

import math

import pytest
import torch

from algorithms.common.group import (
    group_advantages,
    kl_penalty,
    policy_loss,
    reinforce_pp_advantages,
    rloo_advantages,
    zero_std_groups,
)

F64 = torch.float64
# two groups of G = 4: one mixed, one constant
SCORES = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0], dtype=F64)


def t(values: list, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def close(actual: torch.Tensor | float, expected: torch.Tensor | float | list) -> None:
    # measured: |diff| <= 2.2e-16 (relative 2.6e-16) under 4 CPU kernel settings (docs/testing.md), float64
    torch.testing.assert_close(torch.as_tensor(actual, dtype=F64), torch.as_tensor(expected, dtype=F64))


# ---------------------------------------------------------------------------------------------------------
# advantages
# ---------------------------------------------------------------------------------------------------------
def test_group_advantages_divide_by_the_unbiased_group_std() -> None:
    # group 1: mean 1/2, unbiased var = (4 * 1/4) / 3 = 1/3; group 2: all equal, so 0 / (0 + eps) = 0
    std = 1 / math.sqrt(3)
    expected = [0.5 / (std + 1e-4), -0.5 / (std + 1e-4), -0.5 / (std + 1e-4), 0.5 / (std + 1e-4)] + [0.0] * 4
    close(group_advantages(SCORES, 4), expected)


def test_group_advantages_eps_zero_is_half_root_three() -> None:
    half_root_three = 0.5 * math.sqrt(3)  # 0.5 / sqrt(1/3)
    close(
        group_advantages(SCORES[:4], 4, eps=0.0),
        [half_root_three, -half_root_three, -half_root_three, half_root_three],
    )


def test_group_advantages_dr_grpo_does_not_divide() -> None:
    close(group_advantages(SCORES, 4, scale="none"), [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])


def test_group_advantages_batch_scale_uses_group_mean_and_batch_std() -> None:
    # batch mean 10/8 = 1.25; squared deviations 1/16, 25/16, 25/16, 1/16, 4 * 9/16 -> sum 5.5; / 7
    std = math.sqrt(5.5 / 7)
    expected = [x / (std + 1e-4) for x in (0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0, 0.0)]
    close(group_advantages(SCORES, 4, scale="batch"), expected)


def test_group_size_one_gives_zero_advantages() -> None:
    close(group_advantages(t([3.0, -1.0]), 1), [0.0, 0.0])


def test_rloo_is_reward_minus_mean_of_the_others() -> None:
    # [1, 0, 0, 1]: 1 - (0 + 0 + 1)/3 = 2/3, 0 - (1 + 0 + 1)/3 = -2/3; the constant group gets 0
    close(rloo_advantages(SCORES, 4), [2 / 3, -2 / 3, -2 / 3, 2 / 3, 0, 0, 0, 0])
    # [3, 0, 0]: 3 - 0 = 3, 0 - (3 + 0)/2 = -1.5
    close(rloo_advantages(t([3.0, 0.0, 0.0]), 3), [3.0, -1.5, -1.5])


def _whiten(values: list[float]) -> list[float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))  # biased, as OpenRLHF
    return [(v - mean) / std for v in values]


# rows 0-1 are one group, rows 2-3 another; row 2 has one valid token (its padded reward 7 is ignored)
TOKEN_REWARDS = t([[0.0, 1.0], [0.0, 0.0], [3.0, 7.0], [0.5, 0.5]])
MASK = t([[1, 1], [1, 1], [1, 0], [1, 1]])


def test_reinforce_pp_is_globally_whitened_returns_to_go() -> None:
    # returns-to-go (gamma 1): [1, 1], [0, 0], [3, -], [1, 0.5]
    w = _whiten([1, 1, 0, 0, 3, 1, 0.5])
    expected = [[w[0], w[1]], [w[2], w[3]], [w[4], 0.0], [w[5], w[6]]]
    close(reinforce_pp_advantages(TOKEN_REWARDS, MASK), expected)


def test_reinforce_pp_baseline_subtracts_the_group_mean_score_first() -> None:
    # scores 1, 0 (mean 1/2) and 3, 1 (mean 2): returns [0.5, 0.5], [-0.5, -0.5], [1, -], [-1, -1.5]
    w = _whiten([0.5, 0.5, -0.5, -0.5, 1, -1, -1.5])
    expected = [[w[0], w[1]], [w[2], w[3]], [w[4], 0.0], [w[5], w[6]]]
    adv = reinforce_pp_advantages(TOKEN_REWARDS, MASK, baseline=True, group_size=2)
    close(adv, expected)
    # the group baseline changes the result (one group only would be removed by the global mean)
    assert not torch.allclose(adv, reinforce_pp_advantages(TOKEN_REWARDS, MASK))


def test_reinforce_pp_baseline_takes_the_mean_of_the_given_outcome_scores() -> None:
    # a KL term of -0.25 on every valid token changes the row sums, not the outcome scores [1, 0, 3, 1]
    with_kl = TOKEN_REWARDS - 0.25 * MASK
    adv = reinforce_pp_advantages(with_kl, MASK, baseline=True, group_size=2, scores=t([1.0, 0.0, 3.0, 1.0]))
    # returns [0.5, 0.75], [-0.5, -0.25], [2.75, -], [0.5, 0.25]; minus 1/2, 1/2, 2, 2
    w = _whiten([0.0, 0.25, -1.0, -0.75, 0.75, -1.5, -1.75])
    close(adv, [[w[0], w[1]], [w[2], w[3]], [w[4], 0.0], [w[5], w[6]]])


def test_zero_std_groups_picks_exactly_the_constant_groups() -> None:
    scores = t([1, 0, 0, 1, 2, 2, 2, 2, 0, 0, 0, 0, 5, 5, 5, 4.999])
    assert zero_std_groups(scores, 4).tolist() == [False, True, True, False]
    assert zero_std_groups(scores, 2).tolist() == [False, False, True, True, True, True, True, False]


# ---------------------------------------------------------------------------------------------------------
# kl_penalty
# ---------------------------------------------------------------------------------------------------------
def test_kl_penalty_values_follow_the_formulas() -> None:
    logp, ref = t([-1.0, -2.5, -0.1, -4.0]), t([-1.5, -2.0, -0.1, -1.0])
    log_rho = ref - logp  # [-0.5, 0.5, 0, 3]
    close(kl_penalty(logp, ref, "k1"), [0.5, -0.5, 0.0, -3.0])
    close(kl_penalty(logp, ref, "k2"), [0.125, 0.125, 0.0, 4.5])
    close(kl_penalty(logp, ref), [math.exp(x) - 1 - x for x in log_rho.tolist()])  # k3 is the default


@pytest.mark.parametrize("seed", range(3))
def test_kl_penalty_gradients_in_a_loss(seed: int) -> None:
    """E_{a~pi}[grad k(a)] with the expectation an exact sum over a categorical's support (the samples, i.e.
    the weights pi(a), held fixed): k1 -> 0, k2 -> grad KL(pi||ref), k3 -> grad KL(ref||pi)."""
    logits, ref_logits = torch.randn(2, 6, generator=torch.Generator().manual_seed(seed), dtype=F64)
    ref = torch.log_softmax(ref_logits, -1)  # (V,)

    def grad(objective: str) -> torch.Tensor:
        theta = logits.clone().requires_grad_(True)
        logp = torch.log_softmax(theta, -1)  # (V,)
        pi = logp.exp()
        if objective == "KL(pi||ref)":
            value = (pi * (logp - ref)).sum()
        elif objective == "KL(ref||pi)":
            value = (ref.exp() * (ref - logp)).sum()
        else:
            value = (pi.detach() * kl_penalty(logp, ref, objective)).sum()  # type: ignore[arg-type]
        return torch.autograd.grad(value, theta)[0]

    # measured: |diff| <= 1.7e-16 under 4 CPU kernel settings (float64, exact sums over the support)
    torch.testing.assert_close(grad("k1"), torch.zeros(6, dtype=F64), atol=1e-12, rtol=0)
    torch.testing.assert_close(grad("k2"), grad("KL(pi||ref)"), atol=1e-12, rtol=0)
    torch.testing.assert_close(grad("k3"), grad("KL(ref||pi)"), atol=1e-12, rtol=0)
    assert (grad("KL(pi||ref)") - grad("KL(ref||pi)")).norm() > 1e-3  # so k2 and k3 are told apart


# ---------------------------------------------------------------------------------------------------------
# policy_loss: aggregations
# ---------------------------------------------------------------------------------------------------------
# ragged: row 0 has 3 valid tokens, row 1 has 1
AGG_MASK = t([[1, 1, 1], [1, 0, 0]])
TOKEN_ADV = t([[1.0, 2.0, 3.0], [4.0, 99.0, 99.0]])


def _on_policy(advantages: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Loss at ratio 1 (log_prob == old_log_prob), where every valid token's loss is -A; and its gradient."""
    log_prob = torch.zeros(2, 3, dtype=F64, requires_grad=True)
    loss, stats = policy_loss(log_prob, torch.zeros(2, 3, dtype=F64), advantages, AGG_MASK, **kwargs)
    (grad,) = torch.autograd.grad(loss, log_prob)
    return loss, grad, stats


def test_grpo_aggregation_is_the_mean_of_per_sequence_means() -> None:
    loss, grad, _ = _on_policy(TOKEN_ADV, aggregation="grpo")
    close(loss, (-(1 + 2 + 3) / 3 - 4 / 1) / 2)  # -3
    close(grad, [[-1 / 6, -2 / 6, -3 / 6], [-4 / 2, 0, 0]])  # d(ratio)/d(log_prob) = 1 at ratio 1


def test_dapo_aggregation_is_the_token_mean_over_the_batch() -> None:
    loss, grad, _ = _on_policy(TOKEN_ADV, aggregation="dapo")
    close(loss, -(1 + 2 + 3 + 4) / 4)  # -2.5
    close(grad, [[-1 / 4, -2 / 4, -3 / 4], [-4 / 4, 0, 0]])


def test_dr_grpo_aggregation_has_a_constant_normaliser() -> None:
    loss, grad, _ = _on_policy(TOKEN_ADV, aggregation="dr_grpo")
    close(loss, -(1 + 2 + 3 + 4) / (2 * 3))  # B * T
    close(grad, [[-1 / 6, -2 / 6, -3 / 6], [-4 / 6, 0, 0]])
    loss, _, _ = _on_policy(TOKEN_ADV, aggregation="dr_grpo", max_tokens=5)
    close(loss, -(1 + 2 + 3 + 4) / (2 * 5))


def test_aggregations_differ_on_sequence_advantages() -> None:
    adv = t([1.0, 2.0])  # (B,): each row's advantage on all its tokens
    losses = {agg: _on_policy(adv, aggregation=agg)[0].item() for agg in ("grpo", "dapo", "dr_grpo")}
    close(losses["grpo"], -(1 + 2) / 2)
    close(losses["dapo"], -(3 * 1 + 2) / 4)
    close(losses["dr_grpo"], -(3 * 1 + 2) / 6)
    assert len(set(losses.values())) == 3


def test_kl_term_is_added_per_token_with_beta_then_aggregated() -> None:
    kl = t([[0.1, 0.2, 0.3], [0.4, 50.0, 50.0]])  # padding values must not count
    loss, _, stats = _on_policy(TOKEN_ADV, aggregation="dapo", kl=kl, beta=0.5)
    close(loss, -2.5 + 0.5 * (0.1 + 0.2 + 0.3 + 0.4) / 4)
    close(stats["pg_loss"], -2.5)
    close(stats["kl"], 0.25)


# ---------------------------------------------------------------------------------------------------------
# policy_loss: clipping and GSPO
# ---------------------------------------------------------------------------------------------------------
def _one_row(
    ratios: list[float], advantages: list[float], **kwargs
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    log_prob = torch.log(t([ratios])).requires_grad_(True)  # (1, T), old_log_prob 0
    mask = torch.ones_like(log_prob)
    loss, stats = policy_loss(
        log_prob, torch.zeros_like(mask), t([advantages]), mask, aggregation="dapo", **kwargs
    )
    (grad,) = torch.autograd.grad(loss, log_prob)
    return loss, grad, stats


def test_clip_higher_lets_a_ratio_between_the_bounds_through() -> None:
    # token 0: ratio 1.25 with A > 0 lies between 1 + 0.2 and 1 + 0.28; token 1: ratio 1
    loss, grad, stats = _one_row([1.25, 1.0], [1.0, 1.0], eps_low=0.2, eps_high=0.2)
    close(loss, -(1.2 + 1.0) / 2)  # clipped at 1.2, no gradient through it
    close(grad, [[0.0, -0.5]])
    assert (stats["clip_ratio_high"], stats["clip_ratio_low"], stats["clip_ratio"]) == (0.5, 0.0, 0.5)
    loss, grad, stats = _one_row([1.25, 1.0], [1.0, 1.0], eps_low=0.2, eps_high=0.28)
    close(loss, -(1.25 + 1.0) / 2)
    close(grad, [[-1.25 / 2, -0.5]])  # d ratio / d log_prob = ratio
    assert (stats["clip_ratio_high"], stats["clip_ratio"]) == (0.0, 0.0)
    close(stats["approx_kl"], (0.25 - math.log(1.25)) / 2)  # k3 of the token ratios


def test_low_clip_counts_only_negative_advantages() -> None:
    # ratio 0.7 < 1 - 0.2: clipped (and counted) when A < 0; with A > 0 the min keeps the unclipped term
    loss, grad, stats = _one_row([0.7, 0.7], [-1.0, 1.0])
    close(loss, (0.8 - 0.7) / 2)
    close(grad, [[0.0, -0.7 / 2]])
    assert (stats["clip_ratio_low"], stats["clip_ratio_high"], stats["clip_ratio"]) == (0.5, 0.0, 0.5)


def test_high_clip_counts_only_positive_advantages() -> None:
    # ratio 1.5 > 1 + 0.2: clipped (and counted) when A > 0; with A < 0 the min keeps the unclipped term
    loss, grad, stats = _one_row([1.5, 1.5], [1.0, -1.0])
    close(loss, (-1.2 + 1.5) / 2)
    close(grad, [[0.0, 1.5 / 2]])
    assert (stats["clip_ratio_high"], stats["clip_ratio_low"], stats["clip_ratio"]) == (0.5, 0.0, 0.5)


def test_gspo_ratio_is_the_geometric_mean_of_the_valid_token_ratios() -> None:
    log_prob = t([[0.1, 0.3, 5.0], [0.2, 0.0, 0.0]]).requires_grad_(True)  # row 0's last token is padding
    mask = t([[1, 1, 0], [1, 1, 1]])
    adv = t([1.0, 1.0])
    kwargs = {"aggregation": "grpo", "importance": "sequence", "eps_high": 1.0}
    loss, _ = policy_loss(log_prob, torch.zeros(2, 3, dtype=F64), adv, mask, **kwargs)
    s0, s1 = math.exp((0.1 + 0.3) / 2), math.exp(0.2 / 3)  # exp(mean of the masked log-ratios)
    close(loss, -(s0 + s1) / 2)
    (grad,) = torch.autograd.grad(loss, log_prob)
    # d(-s_i / 2) / d log_prob_t = -s_i / (2 |o_i|) on every valid token, 0 on padding
    close(grad, [[-s0 / 4, -s0 / 4, 0.0], [-s1 / 6, -s1 / 6, -s1 / 6]])


def test_gspo_clips_per_sequence_and_counts_sequences() -> None:
    # row 0: s = exp(0.2) = 1.22 > 1.1 (clipped, no gradient); row 1: s = exp(0.05) = 1.05 (inside)
    log_prob = t([[0.2, 0.2, 0.2], [0.05, 0.0, 0.0]]).requires_grad_(True)
    mask = t([[1, 1, 1], [1, 0, 0]])
    loss, stats = policy_loss(
        log_prob, torch.zeros(2, 3, dtype=F64), t([1.0, 1.0]), mask, importance="sequence", eps_high=0.1
    )
    close(loss, -(1.1 + math.exp(0.05)) / 2)
    (grad,) = torch.autograd.grad(loss, log_prob)
    close(grad, [[0.0, 0.0, 0.0], [-math.exp(0.05) / 2, 0.0, 0.0]])
    assert stats["clip_ratio_high"] == 0.5  # one sequence of two, whatever their lengths


# ---------------------------------------------------------------------------------------------------------
# bad arguments
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: group_advantages(SCORES, 3), "group_size must be >= 1 and divide"),
        (lambda: group_advantages(SCORES, 0), "group_size"),
        (lambda: group_advantages(SCORES, 4, scale="std"), "scale must be 'group', 'batch' or 'none'"),
        (lambda: group_advantages(SCORES.view(2, 4), 4), "scores must be 1-D"),
        (lambda: rloo_advantages(SCORES, 1), "rloo needs group_size >= 2"),
        (lambda: reinforce_pp_advantages(TOKEN_REWARDS, MASK[:, :1]), "must both be \\(B, T\\)"),
        (lambda: reinforce_pp_advantages(TOKEN_REWARDS, MASK, scores=SCORES[:4]), "scores is used only"),
        (lambda: kl_penalty(t([0.0]), t([0.0, 1.0])), "one shape"),
        (lambda: kl_penalty(t([0.0]), t([0.0]), "k4"), "'k1', 'k2' or 'k3'"),
        (lambda: _on_policy(TOKEN_ADV, aggregation="bnpo"), "aggregation must be"),
        (lambda: _on_policy(TOKEN_ADV, importance="group"), "importance must be"),
        (lambda: _on_policy(TOKEN_ADV, eps_low=1.0), "eps_low"),
        (lambda: _on_policy(TOKEN_ADV, eps_high=-0.1), "eps_high"),
        (lambda: _on_policy(TOKEN_ADV, max_tokens=0), "max_tokens"),
        (lambda: _on_policy(TOKEN_ADV, beta=0.1), "beta > 0 needs"),
        (lambda: _on_policy(TOKEN_ADV, kl=t([0.0]), beta=0.1), "kl must be"),
        (lambda: _on_policy(t([1.0, 2.0, 3.0])), "advantages must be"),
    ],
)
def test_bad_arguments_raise_value_error(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("aggregation", ["grpo", "dr_grpo", "dapo"])
def test_split_batch_with_the_whole_counts_sums_to_the_whole_loss(aggregation: str) -> None:
    """Two micro-batches (or processes) given the whole step's counts add up to the loss of the whole batch,
    though they hold different numbers of texts and tokens."""
    gen = torch.Generator().manual_seed(0)
    log_prob = torch.randn(5, 4, generator=gen, dtype=F64)
    old = log_prob + 0.3 * torch.randn(5, 4, generator=gen, dtype=F64)
    advantages = torch.randn(5, generator=gen, dtype=F64)
    mask = t([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]])
    settings = dict(aggregation=aggregation, max_tokens=6)
    whole, _ = policy_loss(log_prob, old, advantages, mask, **settings)
    counts = dict(num_sequences=5.0, num_tokens=float(mask.sum()))
    parts = [
        policy_loss(log_prob[rows], old[rows], advantages[rows], mask[rows], **settings, **counts)[0]
        for rows in (slice(0, 2), slice(2, 5))
    ]
    close(parts[0] + parts[1], whole)
    alone = policy_loss(log_prob[:2], old[:2], advantages[:2], mask[:2], **settings)[0]
    assert not math.isclose(float(alone), float(parts[0]))  # the counts matter
