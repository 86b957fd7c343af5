"""The lm-gym command: --help documents every flag; train (and resume), eval and demo run on tiny."""

import json

import pytest

from algorithms.cli import build_parser, main


def test_help_documents_every_hyperparameter(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = capsys.readouterr().out
    for flag in (
        "--learning-rate",
        "--clip-range",
        "--kl-coef",
        "--kl-target",
        "--gae-lambda",
        "--lora-r",
        "--top-p",
        "--n-epochs",
        "--batch-size",
        "--max-grad-norm",
        "--config",
        "--resume",
    ):
        assert flag in text
    assert "AdamW learning rate" in text and "epsilon of the clipped ratio" in text


def test_train_resume_and_eval_on_tiny(tmp_path, capsys):
    run = tmp_path / "run"
    config = tmp_path / "ppo.yaml"
    config.write_text("n_envs: 2\nmax_new_tokens: 4\nlearning_rate: 0.001\n")
    base = [
        "train",
        "--model",
        "tiny",
        "--run-dir",
        str(run),
        "--config",
        str(config),
        "--quiet",
        "--n-epochs",
        "1",
        "--checkpoint-every",
        "1",
    ]
    main([*base, "--iterations", "1"])
    main([*base, "--iterations", "2", "--resume"])
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == [1, 2]
    assert json.loads((run / "config.json").read_text())["n_envs"] == 2  # from the config file
    assert (run / "final" / "model.safetensors").exists()
    assert (run / "checkpoints" / "latest").read_text() == "iter_000002"
    capsys.readouterr()
    main(
        ["eval", "--policy", str(run / "final"), "--num-prompts", "2", "--max-new-tokens", "3", "--show", "1"]
    )
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-2])
    # measured: equal under 4 CPU kernel settings (docs/testing.md)
    assert metrics["texts"] == 2 and metrics["length"] == 3 and metrics["kl"] == pytest.approx(0, abs=1e-4)


def test_bad_input_gives_one_line_errors(tmp_path):
    with pytest.raises(SystemExit, match="unknown keys"):
        config = tmp_path / "bad.yaml"
        config.write_text("learning_rat: 0.1\n")
        main(["train", "--model", "tiny", "--config", str(config), "--run-dir", str(tmp_path / "r")])
    with pytest.raises(SystemExit, match="clip_range must be in"):
        main(["train", "--model", "tiny", "--clip-range", "2", "--run-dir", str(tmp_path / "r")])
    with pytest.raises(SystemExit, match="no checkpoint"):
        main(["train", "--model", "tiny", "--resume", "--run-dir", str(tmp_path / "empty"), "--quiet"])


@pytest.mark.parametrize(
    "algo, flag, value",
    [
        ("a2c", "--vf-coef", "0.5"),
        ("trpo", "--cg-max-steps", "2"),
        ("nlpo", "--n-epochs", "2"),
        ("grpo", "--scale", "none"),  # its own flag
        ("rloo", "--eps-high", "0.28"),  # the critic-free core's
        ("reinforce_pp", "--baseline", None),
    ],
)
def test_every_algorithm_trains_from_the_cli_with_its_own_and_inherited_flags(tmp_path, algo, flag, value):
    base = ["train", "--algo", algo, "--model", "tiny", "--run-dir", str(tmp_path), "--quiet"]
    base += ["--n-envs", "2", "--max-new-tokens", "3", "--iterations", "1"]
    if algo in ("grpo", "rloo", "reinforce_pp"):
        base += ["--group-size", "2"]  # one group of the 2 texts
    main([*base, flag, *([value] if value else [])])
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["algo"] == algo
    key = flag[2:].replace("-", "_")
    assert config[key] == (True if value is None else type(config[key])(value))
    assert (tmp_path / "final" / "model.safetensors").exists()


def test_a_critic_free_recipe_from_a_config_file_trains_and_resumes(tmp_path):
    """DAPO's settings in YAML (docs/training.md), then a resume of the same run."""
    run, config = tmp_path / "run", tmp_path / "dapo.yaml"
    config.write_text(
        "algo: grpo\naggregation: dapo\neps_high: 0.28\ndynamic_sampling: true\nkl_coef: 0.0\n"
        "group_size: 2\nn_envs: 4\nmax_new_tokens: 3\ncheckpoint_every: 1\n"
    )
    base = ["train", "--model", "tiny", "--run-dir", str(run), "--config", str(config), "--quiet"]
    main([*base, "--iterations", "1"])
    main([*base, "--iterations", "2", "--resume"])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["iteration"] for row in rows] == [1, 2]
    assert all("train/clip_ratio_high" in row and "rollout/kl" not in row for row in rows)
    assert json.loads((run / "config.json").read_text())["aggregation"] == "dapo"
    with pytest.raises(SystemExit, match="aggregation"):  # resuming with other settings is refused
        main([*base, "--iterations", "3", "--resume", "--aggregation", "grpo"])


def test_a_flag_of_another_algorithm_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="--clip-range not an argument of a2c"):
        main(["train", "--algo", "a2c", "--model", "tiny", "--run-dir", str(tmp_path), "--clip-range", "0.1"])
