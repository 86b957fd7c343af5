"""The RLHF pipeline: collect -> reward model -> RL, iterated, on tiny models end to end."""

import json

import pytest

from algorithms.cli import main
from algorithms.pipeline import PRESETS, PipelineConfig, run_pipeline
from algorithms.ppo import PPO


def quick(**kwargs):
    settings = {k: v for k, v in PRESETS["quick"].items() if k != "rl_settings"}
    settings.update(collect_prompts=8, iterations=2, eval_every=1, eval_prompts=4)
    rl = {**PRESETS["quick"]["rl_settings"], "n_epochs": 1}
    return PipelineConfig(**{**settings, **kwargs}, rl_settings=rl)


def test_two_rounds_end_to_end_on_tiny(tmp_path):
    report = run_pipeline(quick(rounds=2), PPO, tmp_path, log=lambda *_: None)
    # every round collected, trained a reward model on all data so far, and ran RL from the current policy
    assert [r["round"] for r in report["rounds"]] == [0, 1]
    assert (
        report["rounds"][1]["comparisons_total"]
        == report["rounds"][0]["comparisons"] + report["rounds"][1]["comparisons"]
    )
    for r in (0, 1):
        assert (tmp_path / f"round_{r}" / "preferences.jsonl").exists()
        assert (tmp_path / f"round_{r}" / "reward_model" / "config.json").exists()
        assert 0.0 <= report["rounds"][r]["reward_model"]["eval/accuracy"] <= 1.0
    # evaluation points: the start of each round and every eval_every iterations, the global count going on
    assert [(q["round"], q["iteration"]) for q in report["points"]] == [
        (0, 0),
        (0, 1),
        (0, 2),
        (1, 2),
        (1, 3),
        (1, 4),
    ]
    assert report["points"][0]["kl"] == pytest.approx(0.0, abs=1e-4)  # the initial policy is the reference
    assert report["points"][-1]["kl"] > 0.0
    # an Elo table across the checkpoints of all rounds
    assert [row["checkpoint"] for row in report["elo"]] == ["initial", "round_0", "round_1"]
    assert sum(row["elo"] for row in report["elo"]) == pytest.approx(3 * 1000.0)  # Elo is zero-sum
    text = (tmp_path / "report.md").read_text()
    assert "RM accuracy vs gold" in text and "| round_1 |" in text
    assert (tmp_path / "overoptimization.png").stat().st_size > 0
    assert json.loads((tmp_path / "report.json").read_text())["points"] == report["points"]
    assert (tmp_path / "final" / "model.safetensors").exists()


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="k must be an integer >= 2"):
        run_pipeline(quick(k=1), PPO, "unused", log=lambda *_: None)
    with pytest.raises(ValueError, match="rounds must be an integer >= 1"):
        run_pipeline(quick(rounds=0), PPO, "unused", log=lambda *_: None)


def test_cli_pipeline_quick(tmp_path, capsys):
    main(
        ["pipeline", "--preset", "quick", "--algo", "a2c", "--collect-prompts", "6", "--iterations", "1"]
        + ["--eval-every", "1", "--eval-prompts", "3", "--out", str(tmp_path)]
    )
    assert "RLHF pipeline: tiny on letters, A2C" in capsys.readouterr().out
