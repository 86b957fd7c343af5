"""Elo ratings from pairwise comparisons, and scalar rewards from the ratings.

The "Illustrating RLHF" blog (Lambert et al., Hugging Face 2022) describes turning human comparisons of
outputs into scalar rewards with an Elo system (Elo 1978, "The Rating of Chessplayers"). For players ``a``
and ``b`` with ratings ``R_a`` and ``R_b``:

* expected score of ``a``: ``E_a = 1 / (1 + 10^((R_b - R_a) / 400))`` (and ``E_b = 1 - E_a``);
* after a game with result ``S_a`` (1 win, 0.5 tie, 0 loss): ``R_a += K * (S_a - E_a)`` and
  ``R_b += K * (S_b - E_b)`` with ``S_b = 1 - S_a``, both from the ratings *before* the game.

The updates are zero-sum, so the mean rating of a group of players stays at the initial rating; Elo is
order dependent (the same games in another order give slightly different ratings). Here a player is any
hashable key: a completion ``(prompt, text)``, or a model name when comparing models.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping
from typing import NamedTuple, TypeVar

import numpy as np

__all__ = ["Game", "elo_ratings", "elo_rewards", "expected_score"]

Player = TypeVar("Player", bound=Hashable)


class Game(NamedTuple):
    """One comparison: ``score_a`` is 1.0 when ``a`` won, 0.0 when ``b`` won, 0.5 for a tie."""

    a: Hashable
    b: Hashable
    score_a: float


def expected_score(rating_a: float, rating_b: float) -> float:
    """``E_a = 1 / (1 + 10^((R_b - R_a) / 400))``: the probability that ``a`` beats ``b``."""
    return 1.0 / (1.0 + 10.0 ** ((rating_b - rating_a) / 400.0))


def elo_ratings(
    games: Iterable[tuple[Player, Player, float]],
    *,
    k_factor: float = 32.0,
    initial: float = 1000.0,
    ratings: Mapping[Player, float] | None = None,
) -> dict[Player, float]:
    """Play ``games`` in order and return every player's rating.

    Args:
        games: ``(a, b, score_a)`` triples (e.g. :class:`Game`), ``score_a`` in {1, 0.5, 0}.
        k_factor: ``K``, the largest change one game can make (32, the usual value for new players).
        initial: rating of a player seen for the first time.
        ratings: ratings to start from (left unchanged; the result is a new dict).

    Raises:
        ValueError: if ``k_factor`` is not positive, ``score_a`` is outside [0, 1] or a player plays itself.
    """
    if not k_factor > 0:
        raise ValueError(f"elo_ratings: k_factor must be > 0; got {k_factor}")
    table: dict[Player, float] = dict(ratings or {})
    for n, (a, b, score_a) in enumerate(games):
        if not 0.0 <= score_a <= 1.0:
            raise ValueError(
                f"elo_ratings: game {n}: score_a must be in [0, 1] (1 win, 0.5 tie); got {score_a}"
            )
        if a == b:
            raise ValueError(f"elo_ratings: game {n}: player {a!r} cannot play itself")
        r_a, r_b = table.setdefault(a, initial), table.setdefault(b, initial)
        e_a = expected_score(r_a, r_b)
        table[a] = r_a + k_factor * (score_a - e_a)
        table[b] = r_b + k_factor * ((1.0 - score_a) - (1.0 - e_a))
    return table


def elo_rewards(ratings: Mapping[Player, float]) -> dict[Player, float]:
    """Normalized scalar rewards: the ratings z-scored, ``(R - mean) / std`` (all 0 when they are equal).

    Elo's scale (400 points = odds of 10:1) and its offset (the initial rating) are conventions; a reward
    model or an RL learner wants numbers of order 1 centred on 0.
    """
    keys = list(ratings)
    values = np.array([ratings[k] for k in keys], dtype=np.float64)
    if values.size == 0:
        return {}
    std = values.std()
    z = (values - values.mean()) / std if std > 0 else np.zeros_like(values)
    return {k: float(v) for k, v in zip(keys, z)}
