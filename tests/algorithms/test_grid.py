"""The benchmark grid (algorithms/grid.py): resumable cells, confidence intervals, tables and plots."""

import csv
import json

import numpy as np
import pytest

from algorithms.a2c import A2C
from algorithms.cli import build_parser, main
from algorithms.grid import BenchmarkSpec, mean_ci, preset_spec, run_benchmark
from algorithms.ppo import PPO
from algorithms.presets import GRID, GRID_QUICK
from algorithms.run import ALGORITHMS, RECIPES

SETTINGS = dict(n_envs=2, max_new_tokens=4, learning_rate=1e-3, checkpoint_every=1)


def spec(**kwargs):
    base = dict(
        algorithms={"ppo": PPO, "a2c": A2C},
        seeds=[0, 1],
        task="letters",
        model="tiny",
        iterations=2,
        eval_prompts=2,
        settings=SETTINGS,
        algo_settings={"ppo": {"n_epochs": 1}},
    )
    return BenchmarkSpec(**{**base, **kwargs})


def test_mean_ci_is_the_student_t_interval():
    mean, half = mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0
    # measured: equal under 4 CPU kernel settings (docs/testing.md)
    assert half == pytest.approx(4.303 * 1.0 / np.sqrt(3), rel=1e-4)  # t(0.975, df=2) * s / sqrt(n)
    assert np.isnan(mean_ci([5.0])[1])


def test_grid_writes_tables_and_plots_and_skips_finished_cells(tmp_path, monkeypatch):
    results = run_benchmark(spec(), tmp_path, log=lambda *_: None)
    assert [(r["algo"], r["seed"]) for r in results] == [
        ("initial", 0),
        ("ppo", 0),
        ("a2c", 0),
        ("initial", 1),
        ("ppo", 1),
        ("a2c", 1),
    ]
    # measured: |diff| <= 2.4e-07 (relative 2.4e+293) under 4 CPU kernel settings (docs/testing.md)
    assert all(r["metrics"]["kl"] == pytest.approx(0.0, abs=1e-5) for r in results if r["algo"] == "initial")
    for name in ("results.md", "results.csv", "learning_curves.png", "gold_vs_kl.png"):
        assert (tmp_path / name).stat().st_size > 0
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert [r["algo"] for r in rows] == ["initial", "ppo", "a2c"]
    for key in ("gold", "score", "kl", "perplexity", "distinct_1", "distinct_2", "wall_time_s"):
        mean, _ = mean_ci([r["metrics"][key] for r in results if r["algo"] == "ppo"])
        # measured: equal under 4 CPU kernel settings (docs/testing.md)
        assert float(rows[1][key]) == pytest.approx(mean)
        assert key + "_ci95" in rows[1]
    assert "| ppo | 2 |" in (tmp_path / "results.md").read_text()
    assert len(results[1]["curve"]) == 2

    # a second run reruns nothing
    monkeypatch.setattr("algorithms.grid.run_cell", lambda *a: pytest.fail("a finished cell was rerun"))
    again = run_benchmark(spec(), tmp_path, log=lambda *_: None)
    assert [r["metrics"] for r in again] == [r["metrics"] for r in results]
    monkeypatch.undo()
    # a report of the finished cells only, without training the missing ones (the initial model's is quick)
    partial = run_benchmark(spec(seeds=[0, 1, 2]), tmp_path, log=lambda *_: None, report_only=True)
    assert len(partial) == 7 and "| ppo | 2 |" in (tmp_path / "results.md").read_text()
    assert "| initial | 3 |" in (tmp_path / "results.md").read_text()
    with pytest.raises(ValueError, match="iterations=2, now 3: use another --out"):
        run_benchmark(spec(iterations=3), tmp_path, log=lambda *_: None)


def test_an_interrupted_cell_resumes_from_its_checkpoint(tmp_path):
    one = spec(algorithms={"ppo": PPO}, seeds=[0])
    cell = tmp_path / "ppo" / "seed_0"
    settings = one.cell_settings("ppo", 0)
    from algorithms.policy import LMActorCriticPolicy
    from lm_gym.models import load_causal_lm

    model, tokenizer = load_causal_lm("tiny", seed=0)
    crashed = PPO(LMActorCriticPolicy(model, tokenizer), task="letters", run_dir=cell, verbose=0, **settings)
    crashed.learn(1)  # checkpoint at iteration 1, then "crash" before result.json
    crashed.close()
    (_, result) = run_benchmark(one, tmp_path, log=lambda *_: None)
    iterations = [json.loads(line)["iteration"] for line in (cell / "metrics.jsonl").read_text().splitlines()]
    assert iterations == [1, 2]  # only the missing iteration ran
    assert [c["iteration"] for c in result["curve"]] == [1, 2]


def test_preset_spec_puts_the_given_settings_on_the_preset():
    quick = preset_spec({"ppo": PPO, "a2c": A2C}, quick=True, settings={"n_envs": 2}, iterations=None)
    assert (quick.model, quick.task, quick.iterations, quick.eval_prompts) == ("tiny", "letters", 20, 16)
    assert quick.settings == {**GRID_QUICK["settings"], "n_envs": 2}
    assert quick.algo_settings == {"ppo": {}, "a2c": {}}
    full = preset_spec({"ppo": PPO}, algo_settings={"ppo": {"n_epochs": 1}}, iterations=3)
    assert full.iterations == 3 and full.model == GRID["model"] and full.settings == GRID["settings"]
    assert full.algo_settings == {"ppo": {**GRID["algo_settings"]["ppo"], "n_epochs": 1}}


def test_cli_quick_benchmark(tmp_path, capsys):
    out = tmp_path / "bench"
    main(["benchmark", "--quick", "--algos", "a2c", "--seeds", "1", "--iterations", "2", "--out", str(out)])
    text = capsys.readouterr().out
    assert "| a2c | 1 |" in text and "Task letters, model tiny" in text
    with pytest.raises(SystemExit, match="unknown"):
        main(["benchmark", "--algos", "ppo,sarsa", "--out", str(out)])


def test_cli_benchmark_runs_the_recipes_of_the_critic_free_fixes(tmp_path, capsys):
    """``--algos dapo`` is GRPO with DAPO's settings, under its own name in the tables; a config section for a
    recipe goes on top of the recipe."""
    out, config = tmp_path / "bench", tmp_path / "grid.yaml"
    config.write_text("dapo:\n  eps_high: 0.3\n")
    argv = ["benchmark", "--quick", "--algos", "grpo,dapo,gspo", "--seeds", "1", "--iterations", "2"]
    main([*argv, "--config", str(config), "--out", str(out)])
    text = capsys.readouterr().out
    assert all(f"| {name} | 1 |" in text for name in ("grpo", "dapo", "gspo"))
    settings = {
        name: json.loads((out / name / "seed_0" / "settings.json").read_text()) for name in ("grpo", "dapo")
    }
    recipe = RECIPES["dapo"][1]
    assert {**settings["dapo"], "eps_high": recipe["eps_high"]}.items() >= recipe.items()
    assert settings["dapo"]["eps_high"] == 0.3  # the config's section, on top of the recipe
    assert not {"aggregation", "dynamic_sampling"} & settings["grpo"].keys()


def test_the_benchmark_covers_every_algorithm_by_default():
    assert build_parser().parse_args(["benchmark"]).algos.split(",") == list(ALGORITHMS)
    assert {"grpo", "rloo", "reinforce_pp"} <= ALGORITHMS.keys()
