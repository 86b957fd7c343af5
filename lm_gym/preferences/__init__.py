"""Preference data and reward models: step 2 of RLHF, on the environment side.

* :mod:`~lm_gym.preferences.panel`: a simulated panel of noisy, biased annotators built on a gold scorer;
* :mod:`~lm_gym.preferences.collect`: sample K completions per prompt and have the panel rank them;
* :mod:`~lm_gym.preferences.data`: preference records (``prompt``/``chosen``/``rejected``), JSONL files,
  rankings -> pairs;
* :mod:`~lm_gym.preferences.elo`: Elo ratings of the compared completions and scalar rewards from them;
* :mod:`~lm_gym.preferences.reward_model`: Bradley-Terry training of a scalar reward model whose folder
  ``TextGen-v1`` takes as ``reward=FOLDER``.

Nothing here imports from ``algorithms``.
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
from lm_gym.preferences.reward_model import (
    RewardModelResult,
    bradley_terry_loss,
    evaluate_reward_model,
    save_reward_model,
    train_reward_model,
)

__all__ = [
    "DEFAULT_ANNOTATORS",
    "Annotator",
    "AnnotatorPanel",
    "Collection",
    "Game",
    "Judgement",
    "PreferenceRecord",
    "RewardModelResult",
    "bradley_terry_loss",
    "collect_preferences",
    "elo_ratings",
    "elo_rewards",
    "evaluate_reward_model",
    "expected_score",
    "load_preferences",
    "panel_agreement",
    "preference_dataset",
    "rank_completions",
    "ranking_to_pairs",
    "read_jsonl",
    "sample_completions",
    "save_reward_model",
    "train_reward_model",
    "write_collection",
    "write_jsonl",
]
