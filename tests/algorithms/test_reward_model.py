"""Tests of algorithms.reward_model: Bradley-Terry training on preference records, its evaluation, resume, the
train-rm command, and the trained folder as the env's reward model."""

from __future__ import annotations

import json
import math

import gymnasium as gym
import numpy as np
import pytest
import torch

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
    PreferenceRecord,
    read_jsonl,
)
from lm_gym.rewards import HFRewardModel, make_reward
from tests.toys import tiny_bert_classifier


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
