"""Tests of lm_gym.tasks: the sentiment task's prompts, their split, and task lookup."""

from __future__ import annotations

import pytest

from lm_gym.rewards import VaderSentiment
from lm_gym.tasks import TASKS, Task, get_task
from lm_gym.tasks import split_prompts as split


@pytest.fixture(scope="module")
def sentiment() -> Task:
    """The default task, loaded once."""
    return get_task("sentiment")


def test_sentiment_task_is_registered_and_named(sentiment: Task) -> None:
    assert "sentiment" in TASKS
    assert sentiment.name == "sentiment"
    assert sentiment.description


def test_sentiment_splits_are_non_empty_and_disjoint(sentiment: Task) -> None:
    assert sentiment.train_prompts and sentiment.eval_prompts
    assert not set(sentiment.train_prompts) & set(sentiment.eval_prompts)


def test_sentiment_prompts_have_no_duplicates(sentiment: Task) -> None:
    everything = sentiment.prompts("all")
    assert len(set(everything)) == len(everything)


def test_sentiment_eval_is_about_one_sixth(sentiment: Task) -> None:
    total = len(sentiment.prompts("all"))
    assert abs(len(sentiment.eval_prompts) - total / 6) <= 1


def test_sentiment_has_at_least_300_prompts(sentiment: Task) -> None:
    assert len(sentiment.prompts("all")) >= 300


def test_sentiment_prompts_are_stripped_non_empty_strings(sentiment: Task) -> None:
    for prompt in sentiment.prompts("all"):
        assert isinstance(prompt, str)
        assert prompt.strip()
        assert prompt == prompt.strip()


def test_sentiment_split_is_identical_across_calls(sentiment: Task) -> None:
    again = get_task("sentiment")
    assert again.train_prompts == sentiment.train_prompts
    assert again.eval_prompts == sentiment.eval_prompts


def test_prompts_selects_split(sentiment: Task) -> None:
    assert sentiment.prompts("train") == sentiment.train_prompts
    assert sentiment.prompts("eval") == sentiment.eval_prompts
    assert sentiment.prompts("all") == sentiment.train_prompts + sentiment.eval_prompts


def test_prompts_rejects_unknown_split(sentiment: Task) -> None:
    with pytest.raises(ValueError, match="bogus"):
        sentiment.prompts("bogus")


def test_sentiment_reward_is_vader(sentiment: Task) -> None:
    reward = sentiment.make_reward()
    assert isinstance(reward, VaderSentiment)
    assert reward(["x"], ["I loved it, a wonderful film!"])[0] > 0.5


def test_get_task_unknown_name_lists_available_tasks() -> None:
    with pytest.raises(ValueError, match="sentiment") as info:
        get_task("translation")
    assert "translation" in str(info.value)


def test_split_prompts_is_a_deterministic_partition() -> None:
    prompts = [f"prompt {i}" for i in range(60)]
    train, held_out = split(prompts, eval_fraction=0.25, seed=3)
    assert len(held_out) == 15 and len(train) == 45
    assert sorted(train + held_out) == sorted(prompts)
    assert split(prompts, eval_fraction=0.25, seed=3) == (train, held_out)
    assert split(prompts, eval_fraction=0.25, seed=4)[1] != held_out  # the seed matters
    assert list(train) == [p for p in prompts if p in set(train)]  # original order kept within a split


@pytest.mark.parametrize("fraction", [-0.1, 1.5])
def test_split_prompts_rejects_fraction_outside_unit_interval(fraction: float) -> None:
    with pytest.raises(ValueError, match="eval_fraction"):
        split(["a", "b", "c"], eval_fraction=fraction)


def test_split_prompts_edge_fractions() -> None:
    prompts = ["a", "b", "c"]
    assert split(prompts, eval_fraction=0.0) == (("a", "b", "c"), ())
    assert split(prompts, eval_fraction=1.0) == ((), ("a", "b", "c"))
