"""A simulated panel of annotators who rank completions, offline and reproducibly.

Real preference data comes from labellers who disagree: InstructGPT reports 73% inter-annotator
agreement among its training labellers (Ouyang et al. 2022, Sec. 5.1), and Anthropic's HH data shows
similar levels. Here each annotator sees the K completions of a prompt and judges them by a *gold*
scorer (VADER sentiment for the sentiment task) seen through their own imperfections:

``u_i = gold_i + noise * N(0, 1) + length_bias * (words_i - mean words) / 10 + position_bias * (1 - 2 p_i / (K - 1))``

where ``p_i`` is the position (0 = first) at which completion ``i`` was shown to this annotator, in an
order shuffled per annotator and prompt; with probability ``lapse`` the annotator answers at random (a
uniformly random ranking) instead. The annotator ranks the completions by ``u``.

The panel turns the annotators' rankings into labelled pairs in one of three ways (``aggregate``):

* ``"majority"`` (default): each pair ``(i, j)`` goes to the completion that most annotators ranked
  higher; ``agreement`` is that majority's share. With an odd number of annotators there are no ties, so
  every pair of a prompt is labelled.
* ``"borda"``: one consensus ranking by Borda count (each annotator gives ``K - 1 - rank`` points), then
  its K(K-1)/2 pairs; completions with equal points are a tie and give no pair.
* ``"single"``: one annotator, drawn at random for each prompt, labels all of its pairs: the usual
  one-labeller-per-item budget of real collection. ``agreement`` is then unknown (None).

A pair on which too few annotators agree (``agreement < min_agreement``) is a *tie* for the panel and gets
no label, as real collections drop "about the same" answers: ``min_agreement=0.8`` keeps the pairs on
which at least 4 of 5 annotators agree. Those contested pairs are mostly the ones whose gold scores are
close; dropping them trades quantity for label quality.

:func:`panel_agreement` reports the inter-annotator agreement rate and each annotator's (and the
panel's) agreement with the gold scorer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Literal, NamedTuple

import numpy as np

from lm_gym.preferences.data import ranking_to_pairs
from lm_gym.rewards import RewardFunction, checked_scores

__all__ = ["DEFAULT_ANNOTATORS", "Annotator", "AnnotatorPanel", "Judgement", "panel_agreement"]

AGGREGATES = ("majority", "borda", "single")


@dataclass(frozen=True)
class Annotator:
    """One simulated labeller: the gold scorer seen through noise and biases.

    Args:
        name: shown in reports.
        noise: standard deviation of the Gaussian noise added to each gold score (VADER's scale is [-1, 1]).
        length_bias: utility per 10 words above the mean length of the completions shown (> 0 prefers
            longer texts, < 0 shorter ones).
        position_bias: utility bonus of the completion shown first, falling linearly to minus this for the
            one shown last (primacy effect).
        lapse: probability of answering at random (a uniformly random ranking) for a prompt.
    """

    name: str
    noise: float = 0.25
    length_bias: float = 0.0
    position_bias: float = 0.0
    lapse: float = 0.05

    def __post_init__(self) -> None:
        if self.noise < 0:
            raise ValueError(f"Annotator {self.name!r}: noise must be >= 0; got {self.noise}")
        if not 0.0 <= self.lapse <= 1.0:
            raise ValueError(f"Annotator {self.name!r}: lapse must be in [0, 1]; got {self.lapse}")

    def utilities(self, gold: np.ndarray, words: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The annotator's utility of each of K completions (higher is better), (K,)."""
        k = len(gold)
        shown = rng.permutation(k)  # shown[p] = the completion shown at position p
        position = np.empty(k)
        position[shown] = np.arange(k)
        u = (
            gold
            + self.noise * rng.standard_normal(k)
            + self.length_bias * (words - words.mean()) / 10.0
            + self.position_bias * (1.0 - 2.0 * position / max(k - 1, 1))
        )
        if rng.random() < self.lapse:
            return rng.permutation(k).astype(np.float64)
        return u


# Five labellers of different care: their pairwise agreement is ~0.7, as in InstructGPT (measured on
# SmolLM2 continuations of the sentiment task; see panel_agreement).
DEFAULT_ANNOTATORS = (
    Annotator("careful", noise=0.15, lapse=0.03),
    Annotator("verbose-lover", noise=0.25, length_bias=0.15, position_bias=0.05, lapse=0.05),
    Annotator("terse", noise=0.25, length_bias=-0.1, position_bias=0.1, lapse=0.08),
    Annotator("hasty", noise=0.4, position_bias=0.05, lapse=0.15),
    Annotator("first-impression", noise=0.25, position_bias=0.2, lapse=0.05),
)


class Judgement(NamedTuple):
    """The panel's verdict on the K completions of one prompt.

    ``ranks[a, i]`` is annotator ``a``'s rank of completion ``i`` (0 = best); ``labellers`` are the
    annotators whose labels made ``pairs``; ``pairs`` are ``(winner, loser, agreement)`` index triples.
    """

    prompt: str
    completions: tuple[str, ...]
    gold: np.ndarray  # (K,)
    ranks: np.ndarray  # (A, K)
    labellers: tuple[int, ...]
    pairs: tuple[tuple[int, int, float | None], ...]


class AnnotatorPanel:
    """Several simulated annotators who rank the completions of each prompt.

    Seeded: the same calls in the same order give the same labels.

    Args:
        gold: the gold scorer ``(prompts, completions) -> scores`` (e.g. ``VaderSentiment()``).
        annotators: the panel (default :data:`DEFAULT_ANNOTATORS`).
        aggregate: ``"majority"`` (per pair), ``"borda"`` (one consensus ranking) or ``"single"`` (one
            random annotator per prompt); see the module documentation.
        min_agreement: pairs whose share of agreeing annotators is below this are ties and get no label
            (0.8: 4 of the 5 default annotators; 0 = keep every decided pair; not available with
            ``"single"``, which has no agreement).
        seed: seeds the noise, the presentation orders, the lapses and the ``"single"`` draws.
    """

    def __init__(
        self,
        gold: RewardFunction,
        annotators: Sequence[Annotator] | None = None,
        *,
        aggregate: Literal["majority", "borda", "single"] = "majority",
        min_agreement: float = 0.0,
        seed: int = 0,
    ) -> None:
        annotators = tuple(annotators if annotators is not None else DEFAULT_ANNOTATORS)
        if not annotators:
            raise ValueError("AnnotatorPanel: needs at least one annotator")
        if aggregate not in AGGREGATES:
            raise ValueError(f"AnnotatorPanel: aggregate must be one of {AGGREGATES}; got {aggregate!r}")
        self.gold = gold
        self.annotators = annotators
        if not 0.0 <= min_agreement <= 1.0 or (aggregate == "single" and min_agreement > 0):
            raise ValueError(
                f"AnnotatorPanel: min_agreement must be in [0, 1] (and 0 with aggregate='single'); "
                f"got {min_agreement} with {aggregate!r}"
            )
        self.aggregate = aggregate
        self.min_agreement = min_agreement
        self.rng = np.random.default_rng(seed)

    def judge(self, prompts: Sequence[str], completions: Sequence[Sequence[str]]) -> list[Judgement]:
        """Every annotator ranks the completions of each prompt; the panel labels their pairs.

        Args:
            prompts: N prompts.
            completions: for each prompt, its K >= 2 completions (K may differ between prompts).
        """
        if len(prompts) != len(completions):
            raise ValueError(f"judge: got {len(prompts)} prompts but {len(completions)} lists of completions")
        flat_prompts = [p for p, cs in zip(prompts, completions) for _ in cs]
        flat = [c for cs in completions for c in cs]
        gold_all = checked_scores(self.gold, flat_prompts, flat)
        judgements, start = [], 0
        for prompt, texts in zip(prompts, completions):
            if len(texts) < 2:
                raise ValueError(
                    f"judge: prompt {prompt!r} has {len(texts)} completion(s); at least 2 needed"
                )
            gold = gold_all[start : start + len(texts)]
            start += len(texts)
            words = np.array([len(t.split()) for t in texts], dtype=np.float64)
            utilities = np.stack([a.utilities(gold, words, self.rng) for a in self.annotators])  # (A, K)
            ranks = np.argsort(np.argsort(-utilities, axis=1, kind="stable"), axis=1)  # (A, K), 0 = best
            labellers, pairs = self._label(ranks)
            judgements.append(Judgement(prompt, tuple(texts), gold, ranks, labellers, pairs))
        return judgements

    def _label(self, ranks: np.ndarray) -> tuple[tuple[int, ...], tuple[tuple[int, int, float | None], ...]]:
        n_annotators, k = ranks.shape
        if self.aggregate == "single":
            a = int(self.rng.integers(n_annotators))
            return (a,), tuple((w, lo, None) for w, lo in ranking_to_pairs(ranks[a]))
        everyone = tuple(range(n_annotators))
        if self.aggregate == "borda":
            points = (k - 1 - ranks).sum(axis=0)  # (K,)
            pairs = ranking_to_pairs(-points)
        else:
            pairs = []
            for i, j in combinations(range(k), 2):
                votes_i = int((ranks[:, i] < ranks[:, j]).sum())
                if 2 * votes_i != n_annotators:
                    pairs.append((i, j) if 2 * votes_i > n_annotators else (j, i))
        labelled = [(w, lo, float((ranks[:, w] < ranks[:, lo]).mean())) for w, lo in pairs]
        return everyone, tuple(pair for pair in labelled if pair[2] >= self.min_agreement)


def panel_agreement(judgements: Sequence[Judgement], names: Sequence[str] | None = None) -> dict[str, float]:
    """How much the annotators agree with each other and with the gold scorer, over all completion pairs.

    Returns:
        ``inter_annotator``: share of (annotator pair, completion pair) with the same order;
        ``annotator_gold``: mean share of an annotator's pairs ordered as the gold scorer orders them
        (pairs with equal gold scores left out); ``gold/<name>``: the same per annotator;
        ``panel_gold``: share of the panel's labelled pairs that agree with gold; ``pairs``: labelled
        pairs; ``gold_ties``: share of completion pairs with equal gold scores. A rate with nothing to
        count (e.g. gold ties every pair) is NaN.
    """
    n_annotators = judgements[0].ranks.shape[0] if judgements else 0
    names = list(names) if names is not None else [f"annotator_{a}" for a in range(n_annotators)]
    same = between = 0
    gold_hits = np.zeros(n_annotators)
    gold_pairs = all_pairs = panel_hits = panel_pairs = 0
    for j in judgements:
        for a, b in combinations(range(n_annotators), 2):
            order_a = j.ranks[a][:, None] < j.ranks[a][None, :]  # (K, K): a ranks i above k
            order_b = j.ranks[b][:, None] < j.ranks[b][None, :]
            upper = np.triu(np.ones_like(order_a), 1)
            same += int(((order_a == order_b) & upper).sum())
            between += int(upper.sum())
        for i, k in combinations(range(len(j.gold)), 2):
            all_pairs += 1
            if j.gold[i] == j.gold[k]:
                continue
            gold_pairs += 1
            gold_hits += (j.ranks[:, i] < j.ranks[:, k]) == (j.gold[i] > j.gold[k])
        for w, lo, _ in j.pairs:
            if j.gold[w] != j.gold[lo]:
                panel_pairs += 1
                panel_hits += int(j.gold[w] > j.gold[lo])
    nan = float("nan")
    per_annotator = gold_hits / gold_pairs if gold_pairs else np.full(n_annotators, nan)
    stats = {
        "inter_annotator": same / between if between else nan,
        "annotator_gold": float(per_annotator.mean()) if n_annotators else nan,
        "panel_gold": panel_hits / panel_pairs if panel_pairs else nan,
        "pairs": float(sum(len(j.pairs) for j in judgements)),
        "gold_ties": 1.0 - gold_pairs / max(all_pairs, 1),
    }
    stats.update({f"gold/{name}": float(v) for name, v in zip(names, per_annotator)})
    return stats
