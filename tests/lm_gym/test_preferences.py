"""Tests of lm_gym.preferences: Elo, rankings -> pairs, JSONL records, the annotator panel and collection.

Reward-model training on these records is tests/algorithms/test_reward_model.py."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import lm_gym  # noqa: F401  (registers TextGen-v1)
from lm_gym.preferences import (
    Annotator,
    AnnotatorPanel,
    PreferenceRecord,
    collect_preferences,
    elo_ratings,
    elo_rewards,
    expected_score,
    load_preferences,
    panel_agreement,
    preference_dataset,
    ranking_to_pairs,
    read_jsonl,
    write_collection,
    write_jsonl,
)
from lm_gym.rewards import VaderSentiment

POSITIVE = [
    "a wonderful, moving story.",
    "great acting and a beautiful score.",
    "I loved it, truly delightful.",
    "a fine film, pleasant enough.",
    "brilliant and funny from start to end.",
    "good, if a little long.",
]
NEGATIVE = [
    "a dull, tedious mess.",
    "terrible acting and an awful script.",
    "I hated every boring minute.",
    "weak, but not a disaster.",
    "sad and painfully bad.",
    "poor pacing ruins it.",
]
NEUTRAL = [
    "the film runs two hours.",
    "it was shot in Ohio.",
    "the cast has six actors.",
    "it came out in May.",
]


# ---------------------------------------------------------------------------------------------- Elo
def test_elo_updates_match_hand_computed_values():
    # E = 1 / (1 + 10^((R_b - R_a) / 400)); R_a += K (S_a - E_a), K = 32, both start at 1000.
    assert expected_score(1000, 1000) == 0.5
    # measured: equal under 4 CPU kernel settings (docs/testing.md)
    assert expected_score(1200, 1000) == pytest.approx(1 / (1 + 10**-0.5))  # 0.759747
    r = elo_ratings([("a", "b", 1.0)])
    assert r == {"a": 1016.0, "b": 984.0}
    r = elo_ratings([("a", "b", 1.0), ("b", "a", 0.0)])  # E_a = 1 / (1 + 10^-0.08) = 0.545922
    # measured: equal under 4 CPU kernel settings (docs/testing.md)
    assert r["a"] == pytest.approx(1030.530498, abs=1e-6) and r["b"] == pytest.approx(969.469502, abs=1e-6)
    r = elo_ratings([("a", "b", 1.0), ("a", "c", 0.5)])  # a tie against a lower-rated player costs a
    # measured: equal under 4 CPU kernel settings (docs/testing.md)
    assert r["a"] == pytest.approx(1015.263693, abs=1e-6) and r["c"] == pytest.approx(1000.736307, abs=1e-6)
    # measured: equal under 4 CPU kernel settings (docs/testing.md)
    assert sum(r.values()) == pytest.approx(3000)  # zero-sum


def test_elo_rewards_are_z_scored_and_checks_its_inputs():
    rewards = elo_rewards({"a": 1100.0, "b": 1000.0, "c": 900.0})
    # measured: equal under 4 CPU kernel settings (docs/testing.md)
    assert rewards["a"] == pytest.approx(math.sqrt(1.5)) and rewards["b"] == 0.0
    assert elo_rewards({"a": 1000.0, "b": 1000.0}) == {"a": 0.0, "b": 0.0}
    with pytest.raises(ValueError, match="score_a"):
        elo_ratings([("a", "b", 2.0)])
    with pytest.raises(ValueError, match="itself"):
        elo_ratings([("a", "a", 1.0)])


# ---------------------------------------------------------------------------------------------- records
def test_ranking_gives_k_choose_2_pairs_and_ties_give_none():
    pairs = ranking_to_pairs([2, 1, 4, 3])  # ranks: item 1 best, then 0, 3, 2
    assert len(pairs) == 6
    assert set(pairs) == {(1, 0), (0, 2), (0, 3), (1, 2), (1, 3), (3, 2)}
    assert len(ranking_to_pairs(list(range(7)))) == 21
    assert ranking_to_pairs([1, 1, 2]) == [(0, 2), (1, 2)]


def test_jsonl_round_trip(tmp_path):
    records = [
        PreferenceRecord(
            "The film", " was great.", " was bad.", chosen_score=0.8, rejected_score=-0.8, agreement=0.6
        ),
        PreferenceRecord(
            "", "Human: hi\n\nAssistant: hello, ünïcode", "Human: hi\n\nAssistant: go away", margin=1.0
        ),
    ]
    path = write_jsonl(records, tmp_path / "prefs.jsonl")
    assert read_jsonl(path) == records
    assert load_preferences(path) == records
    first = json.loads(path.read_text(encoding="utf-8").splitlines()[0])
    assert "margin" not in first  # unknown optional fields are left out
    dataset = preference_dataset(path)  # through datasets.load_dataset("json", data_files=...)
    assert dataset.num_rows == 2 and dataset[1]["margin"] == 1.0 and dataset[0]["chosen"] == " was great."


@pytest.mark.parametrize(
    "line, field, problem",
    [
        ({"prompt": "p", "rejected": "b"}, "chosen", "missing"),
        ({"prompt": "p", "chosen": "a", "rejected": 3}, "rejected", "must be a string"),
        ({"prompt": "p", "chosen": "  ", "rejected": "b"}, "chosen", "empty"),
        ({"prompt": ["p"], "chosen": "a", "rejected": "b"}, "prompt", "must be a string"),
        ({"chosen": "a", "rejected": "b", "margin": "big"}, "margin", "number"),
    ],
)
def test_malformed_record_names_file_line_and_field(tmp_path, line, field, problem):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"})
    path.write_text(f"{good}\n\n{json.dumps(line)}\n")  # the blank line still counts
    with pytest.raises(ValueError, match=problem) as err:
        read_jsonl(path)
    assert str(path) in str(err.value) and "line 3" in str(err.value) and f"'{field}'" in str(err.value)


def test_invalid_json_and_missing_file(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"chosen": "a", "rejected": "b"}\n{"chosen": "a",\n')
    with pytest.raises(ValueError, match=r"broken.jsonl line 2: not valid JSON"):
        read_jsonl(path)
    with pytest.raises(FileNotFoundError, match="nothere.jsonl"):
        load_preferences(tmp_path / "nothere.jsonl")


# ---------------------------------------------------------------------------------------------- panel
def _prompt_groups() -> tuple[list[str], list[list[str]]]:
    """24 prompts with 4 completions each, mixing positive, negative and neutral texts."""
    pool = POSITIVE + NEGATIVE + NEUTRAL
    rng = np.random.default_rng(0)
    groups = [[pool[i] for i in rng.choice(len(pool), size=4, replace=False)] for _ in range(24)]
    return [f"Review {n}:" for n in range(24)], groups


def test_panel_is_seeded_and_annotators_disagree_at_a_plausible_rate():
    prompts, groups = _prompt_groups()
    gold = VaderSentiment()
    first = AnnotatorPanel(gold, seed=3).judge(prompts, groups)
    again = AnnotatorPanel(gold, seed=3).judge(prompts, groups)
    other = AnnotatorPanel(gold, seed=4).judge(prompts, groups)
    assert all(np.array_equal(a.ranks, b.ranks) and a.pairs == b.pairs for a, b in zip(first, again))
    assert any(not np.array_equal(a.ranks, b.ranks) for a, b in zip(first, other))
    stats = panel_agreement(first)
    # Real labellers agree on roughly 63-77% of pairs (Anthropic HH, InstructGPT).
    assert 0.55 < stats["inter_annotator"] < 0.9
    assert stats["annotator_gold"] > 0.7
    assert stats["panel_gold"] >= stats["annotator_gold"] - 0.02  # the majority is no worse than one
    # majority of 5: every pair of every prompt gets a label, with its agreement share
    assert stats["pairs"] == 24 * 6
    assert all(0.6 <= agreement <= 1.0 for j in first for _, _, agreement in j.pairs)


def test_panel_aggregates_and_a_noiseless_annotator_matches_gold():
    prompts, groups = _prompt_groups()
    gold = VaderSentiment()
    perfect = Annotator("perfect", noise=0.0, lapse=0.0)
    stats = panel_agreement(AnnotatorPanel(gold, [perfect, perfect], seed=0).judge(prompts, groups))
    assert stats["annotator_gold"] == 1.0 and stats["inter_annotator"] == 1.0
    single = AnnotatorPanel(gold, aggregate="single", seed=0).judge(prompts, groups)
    assert all(len(j.labellers) == 1 and all(a is None for *_, a in j.pairs) for j in single)
    borda = AnnotatorPanel(gold, aggregate="borda", seed=0).judge(prompts, groups)
    assert all(len(j.pairs) <= 6 for j in borda)
    strict = AnnotatorPanel(gold, min_agreement=0.8, seed=0).judge(prompts, groups)  # contested pairs = ties
    kept = [a for j in strict for *_, a in j.pairs]
    assert 0 < len(kept) < 24 * 6 and min(kept) >= 0.8
    with pytest.raises(ValueError, match="min_agreement"):
        AnnotatorPanel(gold, aggregate="single", min_agreement=0.8)
    with pytest.raises(ValueError, match="aggregate"):
        AnnotatorPanel(gold, aggregate="vote")
    with pytest.raises(ValueError, match="lapse"):
        Annotator("x", lapse=1.5)


def test_collect_on_tiny_model_is_seeded_and_writes_records_and_elo(tiny, tmp_path):
    model, tokenizer = tiny
    prompts = ["The film opens on", "A slow", "Critics have been kind to"]

    def collect(seed):
        panel = AnnotatorPanel(VaderSentiment(), seed=seed)
        return collect_preferences(model, tokenizer, prompts, panel, k=3, max_new_tokens=6, seed=seed)

    result = collect(0)
    assert [r.to_json() for r in result.records] == [r.to_json() for r in collect(0).records]
    assert len(result.records) == 3 * 3  # 3 distinct random completions -> 3 pairs per prompt
    assert all(r.chosen_score is not None and r.agreement is not None for r in result.records)
    # measured: |diff| <= 1.7e-15 (relative 1.7e+285) under 4 CPU kernel settings (docs/testing.md)
    assert np.mean(list(result.rewards.values())) == pytest.approx(0.0, abs=1e-9)
    paths = write_collection(result, tmp_path / "prefs.jsonl", settings={"k": 3})
    assert [p.name for p in paths] == ["prefs.jsonl", "prefs.elo.jsonl", "prefs.meta.json"]
    assert read_jsonl(paths[0]) == result.records
    assert len(paths[1].read_text().splitlines()) == 9
    assert json.loads(paths[2].read_text())["settings"] == {"k": 3}


# ---------------------------------------------------------------------------------------------- reward model
