"""The RLHF pipeline: collect -> reward model -> RL, iterated, on tiny models end to end."""

import json

import pytest
import torch
from safetensors.torch import load_file

from algorithms.a2c import A2C
from algorithms.cli import main
from algorithms.pipeline import PipelineConfig, preset_config, run_pipeline
from algorithms.ppo import PPO
from algorithms.presets import PIPELINE_PRESETS


def quick(**kwargs):
    settings = {k: v for k, v in PIPELINE_PRESETS["quick"].items() if k != "rl_settings"}
    settings.update(collect_prompts=8, iterations=2, eval_every=1, eval_prompts=4)
    rl = {**PIPELINE_PRESETS["quick"]["rl_settings"], "n_epochs": 1}
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
    # measured: |diff| <= 2.4e-07 (relative 2.4e+293) under 4 CPU kernel settings (docs/testing.md)
    assert report["points"][0]["kl"] == pytest.approx(0.0, abs=1e-4)  # the initial policy is the reference
    assert report["points"][-1]["kl"] > 0.0
    # an Elo table across the checkpoints of all rounds
    assert [row["checkpoint"] for row in report["elo"]] == ["initial", "round_0", "round_1"]
    # measured: equal under 4 CPU kernel settings (docs/testing.md)
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


def test_preset_config_puts_the_given_settings_on_the_preset():
    config = preset_config("quick", A2C, rl_settings={"kl_coef": 0.1}, iterations=3, rounds=None)
    assert config.model == "tiny" and config.iterations == 3 and config.rounds == 1  # None: the preset's
    quick_rl = PIPELINE_PRESETS["quick"]["rl_settings"]
    assert config.rl_settings == {**quick_rl, "kl_coef": 0.1} and config.policy_settings == {}
    # the preset's PPO epochs and minibatches are left out for A2C, which has no n_epochs
    assert "n_epochs" in PIPELINE_PRESETS["default"]["rl_settings"]
    assert "n_epochs" not in preset_config("default", A2C).rl_settings
    assert preset_config("default", PPO).rl_settings == PIPELINE_PRESETS["default"]["rl_settings"]


def test_cli_pipeline_quick(tmp_path, capsys):
    main(
        ["pipeline", "--preset", "quick", "--algo", "a2c", "--collect-prompts", "6", "--iterations", "1"]
        + ["--eval-every", "1", "--eval-prompts", "3", "--out", str(tmp_path)]
    )
    assert "RLHF pipeline: tiny on letters, A2C" in capsys.readouterr().out


def _crash_on_call(monkeypatch, module, name: str, n: int) -> None:
    """Make ``module.name`` raise on its n-th call: a crash at that point of the run."""
    real, calls = getattr(module, name), []

    def crashing(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, crashing)


def test_resume_after_crashes_equals_the_uninterrupted_run(tmp_path, monkeypatch):
    """A run that crashes in round 1's reward-model training, resumes, crashes in round 1's RL, and resumes
    again ends with the uninterrupted run's report points, round summaries, Elo table and final weights."""
    import algorithms.reward_model as rm_module
    import lm_gym.evaluation

    quiet = dict(log=lambda *_: None)
    whole = run_pipeline(quick(rounds=2), PPO, tmp_path / "whole", **quiet)
    run = tmp_path / "run"

    # 1. in round 1's second reward-model epoch (2 held-out evaluations a training): after its first checkpoint
    with monkeypatch.context() as m:
        _crash_on_call(m, rm_module, "evaluate_reward_model", 4)
        with pytest.raises(RuntimeError, match="simulated crash"):
            run_pipeline(quick(rounds=2), PPO, run, **quiet)
    state = json.loads((run / "pipeline_state.json").read_text())
    assert len(state["rounds"]) == 1 and state["current"]["round"] == 1 and "panel" in state["current"]
    assert "reward_model" not in state["current"]
    assert (run / "round_1" / "reward_model_checkpoints" / "epoch_000001").exists()

    # 2. resumed: round 0 read back, round 1's collection read back, its reward model resumed from the
    # checkpoint; then a crash at round 1's second evaluation, after the RL checkpoint at its iteration 1
    with monkeypatch.context() as m:
        _crash_on_call(m, lm_gym.evaluation, "evaluate", 2)
        with pytest.raises(RuntimeError, match="simulated crash"):
            run_pipeline(quick(rounds=2), PPO, run, resume=True, **quiet)
    state = json.loads((run / "pipeline_state.json").read_text())
    assert [(q["round"], q["iteration"]) for q in state["points"]] == [(0, 0), (0, 1), (0, 2), (1, 2)]
    assert not (run / "round_1" / "reward_model_checkpoints").exists()  # removed once the folder is written

    # 3. resumed again: the RL of round 1 continues from its checkpoint
    resumed = run_pipeline(quick(rounds=2), PPO, run, resume=True, **quiet)
    assert resumed["points"] == whole["points"]
    assert resumed["elo"] == whole["elo"]
    untimed = lambda rounds: [  # noqa: E731
        {**r, "reward_model": {k: v for k, v in r["reward_model"].items() if not k.startswith("time/")}}
        for r in rounds
    ]
    assert untimed(resumed["rounds"]) == untimed(whole["rounds"])
    expected, got = (load_file(d / "final" / "model.safetensors") for d in (tmp_path / "whole", run))
    assert expected.keys() == got.keys()
    for name, value in expected.items():
        assert torch.equal(value, got[name]), name

    # settings other than the run's are refused, naming the setting; so is a folder with no run
    changed = quick(rounds=2)
    changed.rl_settings["kl_coef"] = 0.1
    with pytest.raises(ValueError, match=r"was run with rl_settings\.kl_coef=0\.05, now 0\.1"):
        run_pipeline(changed, PPO, run, resume=True, **quiet)
    with pytest.raises(SystemExit, match="no pipeline run to resume in"):
        main(["pipeline", "--preset", "quick", "--out", str(tmp_path / "empty"), "--resume"])
