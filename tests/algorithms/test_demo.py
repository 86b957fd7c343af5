"""The RLHF demo on tiny: the report over several seeds, and the same run twice on one machine is identical."""

import json

import torch
from safetensors.torch import load_file

from algorithms.cli import main
from algorithms.demo import cpu_name


def run_demo(run_dir, *seeds, iterations=1):
    argv = ["demo", "--model", "tiny", "--iterations", str(iterations), "--eval-prompts", "2"]
    main([*argv, "--max-new-tokens", "3", "--seeds", *map(str, seeds), "--run-dir", str(run_dir)])
    return {s: load_file(run_dir / f"seed{s}" / "final" / "model.safetensors") for s in seeds}


def test_demo_reports_the_mean_and_spread_over_seeds_and_the_machine(tmp_path):
    run_demo(tmp_path, 0, 1)
    report = (tmp_path / "demo_report.md").read_text()
    assert "mean ± standard deviation over 2 seed(s)" in report and cpu_name() in report
    assert "| gold sentiment (VADER compound, mean) | " in report and report.count(" ± ") >= 12
    assert "--seeds 0 1" in report and "Gold lift" in report
    assert (tmp_path / "learning_curve.png").stat().st_size > 1000
    for seed in (0, 1):
        rows = [
            json.loads(line) for line in (tmp_path / f"seed{seed}" / "metrics.jsonl").read_text().splitlines()
        ]
        assert [r["iteration"] for r in rows] == [1]


def test_the_tiny_smoke_run_on_letters_has_a_reward_to_learn(tmp_path):
    """The smoke command of the README: tiny on the letters task, whose reward is not identically 0 (VADER
    scores tiny's random bytes 0)."""
    argv = ["demo", "--model", "tiny", "--task", "letters", "--iterations", "1", "--eval-prompts", "2"]
    main([*argv, "--max-new-tokens", "3", "--seeds", "0", "--run-dir", str(tmp_path)])
    report = (tmp_path / "demo_report.md").read_text()
    assert "--task letters" in report and "| gold (letters task's scorer, mean) | " in report
    row = json.loads((tmp_path / "seed0" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["rollout/rm_score"] > 0


def test_same_seed_is_bit_for_bit_on_one_machine(tmp_path):
    """The README's claim: with the same machine and package versions, a seed fixes the whole demo."""
    first, again = run_demo(tmp_path / "a", 0, 1, iterations=2), run_demo(tmp_path / "b", 0, iterations=2)
    assert first[0].keys() == again[0].keys()
    for name, weight in first[0].items():
        assert torch.equal(weight, again[0][name]), name
    assert any(not torch.equal(w, first[1][n]) for n, w in first[0].items())  # another seed, another run
    tables = [(tmp_path / d / "demo_report.md").read_text().split("\n\n")[1] for d in ("a", "b")]
    assert "| gold" in tables[0]
