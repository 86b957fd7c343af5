"""Preference data and reward models: step 2 of RLHF, on the environment side.

* :mod:`~lm_gym.preferences.panel`: a simulated panel of noisy, biased annotators built on a gold scorer;
* :mod:`~lm_gym.preferences.collect`: sample K completions per prompt and have the panel rank them;
* :mod:`~lm_gym.preferences.data`: preference records (``prompt``/``chosen``/``rejected``), JSONL files,
  rankings -> pairs;
* :mod:`~lm_gym.preferences.elo`: Elo ratings of the compared completions and scalar rewards from them;
Training a reward model on these records is training machinery: :mod:`algorithms.reward_model` (its
folder is what ``TextGen-v1`` takes as ``reward=FOLDER``). Nothing here imports from ``algorithms``.
"""

from lm_gym.preferences.collect import (
    Collection,
    collect_preferences,
    rank_completions,
    sample_completions,
    write_collection,
)
from lm_gym.preferences.data import (
    PreferenceRecord,
    load_preferences,
    preference_dataset,
    ranking_to_pairs,
    read_jsonl,
    write_jsonl,
)
from lm_gym.preferences.elo import Game, elo_ratings, elo_rewards, expected_score
from lm_gym.preferences.panel import DEFAULT_ANNOTATORS, Annotator, AnnotatorPanel, Judgement, panel_agreement

__all__ = [
    "DEFAULT_ANNOTATORS",
    "Annotator",
    "AnnotatorPanel",
    "Collection",
    "Game",
    "Judgement",
    "PreferenceRecord",
    "collect_preferences",
    "elo_ratings",
    "elo_rewards",
    "expected_score",
    "load_preferences",
    "panel_agreement",
    "preference_dataset",
    "rank_completions",
    "ranking_to_pairs",
    "read_jsonl",
    "sample_completions",
    "write_collection",
    "write_jsonl",
]
