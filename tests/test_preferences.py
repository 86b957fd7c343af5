"""Tests of lm_gym.preferences: Elo, rankings -> pairs, JSONL records, the annotator panel, collection,
Bradley-Terry reward-model training, and the trained folder as the env's reward model."""

from __future__ import annotations

import json
import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from toys import tiny_bert_classifier

import lm_gym  # noqa: F401  (registers TextGen-v1)
from algorithms.reward_model import (
    accuracy_report,
    bradley_terry_loss,
    evaluate_reward_model,
    save_reward_model,
    score_texts,
    split_by_prompt,
    train_reward_model,
)
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
from lm_gym.rewards import HFRewardModel, VaderSentiment, make_reward

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
def _planted_records(n_prompts: int = 40) -> list[PreferenceRecord]:
    """Chosen completions contain the marker word 'zap'; rejected ones never do."""
    rng = np.random.default_rng(0)
    words = ["the", "plot", "film", "slow", "cast", "long", "music", "ends", "scene", "then"]
    records = []
    for n in range(n_prompts):
        for _ in range(3):
            filler = " ".join(rng.choice(words, size=4))
            other = " ".join(rng.choice(words, size=4))
            records.append(
                PreferenceRecord(f"Review {n}:", f" {filler} zap", f" {other} {rng.choice(words)}")
            )
    return records


def _marker_gold(prompts, completions):
    return np.array([float("zap" in c) for c in completions])


def test_bradley_terry_loss_by_hand():
    r_c, r_r = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0])
    expected = (math.log1p(math.exp(-1.0)) + math.log(2.0)) / 2  # -log sigmoid(x) = log(1 + e^-x)
    # measured: |diff| <= 6.0e-08 (relative 1.2e-07) under 4 CPU kernel settings (docs/testing.md)
    assert bradley_terry_loss(r_c, r_r).item() == pytest.approx(expected)
    with_margin = (math.log(2.0) + math.log1p(math.exp(1.0))) / 2  # margin 1 on both pairs
    # measured: equal under 4 CPU kernel settings (docs/testing.md)
    assert bradley_terry_loss(r_c, r_r, margin=1.0).item() == pytest.approx(with_margin)
    centered = bradley_terry_loss(r_c, r_r, center_coef=0.01).item()
    # measured: equal under 4 CPU kernel settings (docs/testing.md)
    assert centered == pytest.approx(expected + 0.01 * (1.0 + 0.0) / 2)
    # vote shares as targets: t = 1 is the hard loss; t = 0.6 mixes both directions
    # measured: |diff| <= 6.0e-08 (relative 1.2e-07) under 4 CPU kernel settings (docs/testing.md)
    assert bradley_terry_loss(r_c, r_r, targets=torch.ones(2)).item() == pytest.approx(expected)
    soft = (0.6 * math.log1p(math.exp(-1.0)) + 0.4 * math.log1p(math.exp(1.0)) + math.log(2.0)) / 2
    # measured: equal under 4 CPU kernel settings (docs/testing.md)
    assert bradley_terry_loss(r_c, r_r, targets=torch.tensor([0.6, 0.9])).item() == pytest.approx(soft)


def test_split_by_prompt_keeps_prompts_on_one_side():
    records = _planted_records(20)
    train, held_out = split_by_prompt(records, 0.25, seed=0)
    assert len(train) + len(held_out) == len(records) and len(held_out) == 5 * 3
    assert not {r.prompt for r in train} & {r.prompt for r in held_out}


@pytest.fixture(scope="module")
def trained_rm(tmp_path_factory):
    model, tokenizer = tiny_bert_classifier()
    out = tmp_path_factory.mktemp("rm")
    result = train_reward_model(
        _planted_records(),
        model=model,
        tokenizer=tokenizer,
        epochs=4,
        learning_rate=2e-3,
        batch_size=12,
        eval_fraction=0.25,
        center_coef=0.01,
        gold=_marker_gold,
        out_dir=out,
        seed=0,
        log=None,
    )
    return result, out


def test_bradley_terry_training_separates_a_planted_preference(trained_rm):
    result, out = trained_rm
    assert result.metrics["eval/accuracy"] >= 0.9  # chance is 0.5
    assert result.metrics["eval/accuracy_gold"] == result.metrics["eval/accuracy"]  # labels == gold here
    assert result.metrics["eval/labels_gold"] == 1.0
    assert result.history[-1]["train/loss"] < result.history[0]["train/loss"]
    info = json.loads((out / "reward_model.json").read_text())
    assert (
        info["include_prompt"] is True and info["metrics"]["eval/accuracy"] == result.metrics["eval/accuracy"]
    )
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()


def test_accuracy_is_broken_down_by_annotator_agreement(trained_rm):
    result, _ = trained_rm
    records = [r._replace(agreement=0.6 if i % 2 else 1.0) for i, r in enumerate(_planted_records(4))]
    flipped = records[0]._replace(chosen=records[0].rejected, rejected=records[0].chosen)  # a wrong label
    m = evaluate_reward_model(result.model, result.tokenizer, [flipped, *records[1:]], gold=_marker_gold)
    assert m["pairs"] == 12 and m["confident_pairs"] == 6  # agreement 1.0 >= 0.8
    assert m["labels_gold_confident"] == 5 / 6 and m["labels_gold"] == 11 / 12
    assert set(m) >= {
        "accuracy_gold/agreement_0.60",
        "accuracy_gold/agreement_1.00",
        "accuracy_gold_confident",
    }
    text = accuracy_report({f"eval/{k}": v for k, v in m.items()})
    assert "against the gold scorer" in text and "1.00:" in text


def test_trained_folder_is_the_env_reward_model(trained_rm):
    result, out = trained_rm
    reward = make_reward(str(out))
    assert isinstance(reward, HFRewardModel) and reward.model.config.num_labels == 1
    prompts, completions = ["Review 1:", "Review 1:"], [" the plot zap", " the plot ends"]
    scores = reward(prompts, completions)
    expected = score_texts(result.model, result.tokenizer, [p + c for p, c in zip(prompts, completions)])
    # measured: |diff| <= 3.0e-08 (relative 9.9e-08) under 4 CPU kernel settings (docs/testing.md)
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-5)
    assert scores[0] > scores[1]
    env = gym.make("TextGen-v1", model="tiny", reward=str(out), max_new_tokens=3, kl_coef=0.0)
    env.reset(seed=0)
    done, info = False, {}
    while not done:
        _, _, terminated, truncated, info = env.step(env.action_space.sample())
        done = terminated or truncated
    assert np.isfinite(info["score"])
    env.close()


def test_folder_records_whether_the_prompt_is_scored(trained_rm, tmp_path):
    result, _ = trained_rm
    folder = save_reward_model(result, tmp_path / "completion_only", include_prompt=False)
    reward = make_reward(str(folder))
    assert reward.include_prompt is False  # read from config.json (lm_gym_reward_input)
    scores = reward(["Review 1: zap zap", "x"], [" the plot ends", " the plot zap"])
    expected = score_texts(result.model, result.tokenizer, [" the plot ends", " the plot zap"])
    # measured: |diff| <= 1.5e-08 (relative 6.8e-08) under 4 CPU kernel settings (docs/testing.md)
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-5)
    assert make_reward(str(folder), include_prompt=True).include_prompt is True  # an explicit choice wins


def test_reward_model_resumes_after_a_crash_as_the_uninterrupted_run(tmp_path, monkeypatch):
    """Epoch checkpoints: a run that crashes in its second epoch and resumes from the first epoch's checkpoint
    ends with the uninterrupted run's weights and history; other settings or data are refused."""
    import algorithms.reward_model as rm_module

    records = _planted_records(12)  # 27 training pairs: 3 steps an epoch
    settings = dict(epochs=3, learning_rate=2e-3, batch_size=12, eval_fraction=0.25, center_coef=0.01)
    settings.update(gold=_marker_gold, seed=0, log=None)

    def run(folder, **extra):
        model, tokenizer = tiny_bert_classifier()
        return train_reward_model(
            records,
            model=model,
            tokenizer=tokenizer,
            checkpoint_dir=tmp_path / folder,
            **{**settings, **extra},
        )

    whole = run("whole")
    real_loss, calls = rm_module.bradley_terry_loss, []

    def crash_in_epoch_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # the second step of epoch 2
            raise RuntimeError("simulated crash")
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(rm_module, "bradley_terry_loss", crash_in_epoch_2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run("run")
    monkeypatch.setattr(rm_module, "bradley_terry_loss", real_loss)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["epoch_000001", "latest"]
    resumed = run("run", resume=True)
    for (name, p), q in zip(whole.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), name
    untimed = [
        [{k: v for k, v in h.items() if k != "time/elapsed_s"} for h in r.history] for r in (whole, resumed)
    ]
    assert untimed[0] == untimed[1] and len(untimed[0]) == 3
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["epoch_000003", "latest"]  # keeps 1
    with pytest.raises(ValueError, match=r"was run with learning_rate=0\.002, now 0\.001"):
        run("run", resume=True, learning_rate=1e-3)
    with pytest.raises(ValueError, match="was run with data="):
        model, tokenizer = tiny_bert_classifier()
        train_reward_model(
            records[3:],
            model=model,
            tokenizer=tokenizer,
            checkpoint_dir=tmp_path / "run",
            resume=True,
            **settings,
        )
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        run("nothing", resume=True)


def test_cli_collect_and_train_rm_on_tiny(tmp_path, capsys):
    from algorithms.cli import main

    model, tokenizer = tiny_bert_classifier()
    backbone = tmp_path / "backbone"
    model.save_pretrained(backbone)
    tokenizer.save_pretrained(backbone)
    prefs = tmp_path / "prefs.jsonl"
    main(
        [
            "collect",
            "--model",
            "tiny",
            "--num-prompts",
            "4",
            "--k",
            "3",
            "--max-new-tokens",
            "4",
            "--out",
            str(prefs),
        ]
    )
    assert len(read_jsonl(prefs)) > 0 and (tmp_path / "prefs.elo.jsonl").exists()
    out = tmp_path / "rm"
    main(
        [
            "train-rm",
            "--data",
            str(prefs),
            "--model",
            str(backbone),
            "--out",
            str(out),
            "--epochs",
            "1",
            "--eval-fraction",
            "0.25",
        ]
    )
    text = capsys.readouterr().out
    assert "inter-annotator agreement" in text and "held-out accuracy" in text
    assert (out / "model.safetensors").exists() and (out / "checkpoints" / "latest").exists()
    train_rm = ["train-rm", "--data", str(prefs), "--model", str(backbone), "--out", str(out)]
    with pytest.raises(SystemExit, match=r"lm-gym train-rm: error: .* was run with epochs=1, now 2: "):
        main([*train_rm, "--epochs", "2", "--eval-fraction", "0.25", "--resume"])


def test_default_batches_hold_one_prompts_pairs():
    """batch_size=None: each step is one prompt's comparisons (InstructGPT), whatever K; records sharing one
    prompt (HH-RLHF) fall back to shuffled batches of SHARED_PROMPT_BATCH pairs."""
    from algorithms.reward_model import SHARED_PROMPT_BATCH, _batches

    sizes = {"a": 3, "b": 6, "c": 1}
    records = [PreferenceRecord(p, f" x{i}", f" y{i}") for p, n in sizes.items() for i in range(n)]
    batches = _batches(records, None, np.random.default_rng(0))
    assert sorted(len(b) for b in batches) == [1, 3, 6]
    assert all(len({r.prompt for r in b}) == 1 for b in batches)
    assert sorted((r.prompt, r.chosen) for b in batches for r in b) == sorted(
        (r.prompt, r.chosen) for r in records
    )
    shared = [PreferenceRecord("", f" x{i}", f" y{i}") for i in range(70)]
    assert [len(b) for b in _batches(shared, None, np.random.default_rng(0))] == [SHARED_PROMPT_BATCH] * 2 + [
        6
    ]
    assert [len(b) for b in _batches(records, 4, np.random.default_rng(0))] == [4, 4, 2]
