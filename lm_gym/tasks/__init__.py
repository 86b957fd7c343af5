"""Tasks: a prompt set with its train/eval split and its (gold) reward.

``get_task("sentiment")`` is the default: continue the opening of a movie review; the reward is VADER's
positive sentiment of the continuation. ``"letters"`` is a toy on the same prompts whose reward (the
share of lowercase letters) a tiny random model learns in minutes.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources

import numpy as np

from lm_gym.rewards import LowercaseShare, RewardFunction, VaderSentiment, as_text_list

__all__ = ["TASKS", "Task", "get_task"]


@dataclass(frozen=True)
class Task:
    """A prompt set and how to score continuations of it.

    Args:
        name: the task's name.
        train_prompts: prompts to train on (a sequence of strings; one string is refused, not split into
            one prompt per character).
        eval_prompts: held-out prompts, never seen in training.
        make_reward: builds the task's gold reward function.
        description: one line for ``--help`` and reports.
    """

    name: str
    train_prompts: tuple[str, ...]
    eval_prompts: tuple[str, ...]
    make_reward: Callable[[], RewardFunction]
    description: str = ""

    def __post_init__(self) -> None:
        for field in ("train_prompts", "eval_prompts"):
            as_text_list(getattr(self, field), f"task {self.name!r}: {field}")

    def prompts(self, split: str) -> tuple[str, ...]:
        """The prompts of ``split`` (``"train"``, ``"eval"`` or ``"all"``)."""
        if split == "train":
            return self.train_prompts
        if split == "eval":
            return self.eval_prompts
        if split == "all":
            return self.train_prompts + self.eval_prompts
        raise ValueError(f"split must be 'train', 'eval' or 'all'; got {split!r}")


def split_prompts(prompts: Sequence[str], eval_fraction: float, seed: int = 0) -> tuple[tuple[str, ...], ...]:
    """A deterministic shuffle-and-cut into (train, eval); the same on every machine.

    Raises:
        TypeError: if ``prompts`` is one string (see :func:`lm_gym.rewards.as_text_list`).
        ValueError: if ``eval_fraction`` is outside [0, 1] (a negative one would cut from the end).
    """
    prompts = as_text_list(prompts, "prompts")
    if not 0.0 <= eval_fraction <= 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1]; got {eval_fraction}")
    order = np.random.default_rng(seed).permutation(len(prompts))
    n_eval = int(round(len(prompts) * eval_fraction))
    eval_idx = set(order[:n_eval].tolist())
    train = tuple(p for i, p in enumerate(prompts) if i not in eval_idx)
    held_out = tuple(p for i, p in enumerate(prompts) if i in eval_idx)
    return train, held_out


def _sentiment() -> Task:
    text = resources.files("lm_gym.tasks").joinpath("data/movie_review_openings.txt").read_text("utf-8")
    # Drop repeated lines (keeping the first): a prompt in both splits would leak eval into training.
    openings = list(dict.fromkeys(line.strip() for line in text.splitlines() if line.strip()))
    train, held_out = split_prompts(openings, eval_fraction=1 / 6, seed=0)
    return Task(
        name="sentiment",
        train_prompts=train,
        eval_prompts=held_out,
        make_reward=VaderSentiment,
        description="continue a movie-review opening; reward: VADER positive sentiment of the continuation",
    )


def _sentiment_fluent() -> Task:
    return dataclasses.replace(
        _sentiment(),
        name="sentiment-fluent",
        make_reward=functools.partial(VaderSentiment, penalize_repetition=True),
        description="the sentiment prompts; reward: VADER sentiment, pulled toward -1 by repeated bigrams "
        "(a gold scorer that repetition cannot game)",
    )


def _letters() -> Task:
    return dataclasses.replace(
        _sentiment(),
        name="letters",
        make_reward=LowercaseShare,
        description="toy task for tiny models: the sentiment prompts; reward: share of lowercase letters",
    )


TASKS: dict[str, Callable[[], Task]] = {
    "sentiment": _sentiment,
    "sentiment-fluent": _sentiment_fluent,
    "letters": _letters,
}


def get_task(name: str) -> Task:
    """The task called ``name`` (see ``TASKS``)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(sorted(TASKS))}")
    return TASKS[name]()
