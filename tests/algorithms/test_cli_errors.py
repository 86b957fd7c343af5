"""Every mistake a user can make on the lm-gym command line ends it with one line that names the flag (or the
config file and key) and what is allowed; no traceback unless --debug asks for one."""

import errno
import json
import re

import pytest
import torch

from algorithms import cli
from algorithms.cli import build_parser, main
from algorithms.common.on_policy import NonFiniteLossError


def error_line(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    """Run ``lm-gym argv``, which must fail; return its error line, checked: one line, no traceback."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    code = exited.value.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if isinstance(code, str):  # main's own: sys.exit(message), exit status 1
        message = code
    else:  # argparse's: the usage, then one error line, exit status 2
        assert code == 2
        message = err.strip().splitlines()[-1]
    assert "\n" not in message and message.startswith("lm-gym ")
    return message


@pytest.fixture
def prefs(tmp_path):
    path = tmp_path / "prefs.jsonl"
    rows = [{"prompt": p, "chosen": " good", "rejected": " bad"} for p in ("a", "b", "c", "d")]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


SMALL = ["--n-envs", "2", "--max-new-tokens", "2", "--quiet"]  # what a run the old code let through costs
# The tiny model, and files in the test's folder, for the commands that load a model or write.
EXTRA = {
    "train": ["--model", "tiny", "--run-dir", "{tmp}/run"],
    "demo": ["--model", "tiny", "--run-dir", "{tmp}/demo"],
    "eval": ["--policy", "tiny"],
    "collect": ["--model", "tiny", "--out", "{tmp}/prefs.jsonl"],
    "train-rm": ["--data", "{prefs}", "--model", "tiny", "--out", "{tmp}/rm", "--no-gold"],
    "benchmark": ["--quick", "--report-only", "--out", "{tmp}/bench"],
}


@pytest.mark.parametrize(
    "argv, pattern",
    [
        (
            ["train", "--iterations", "0", *SMALL],
            r"train: error: argument --iterations: must be an integer >= 1; got 0$",
        ),
        (["train", "--iterations", "-3", *SMALL], r"argument --iterations: must be an integer >= 1; got -3$"),
        (["train", "--iterations", "two"], r"argument --iterations: must be an integer >= 1; got 'two'$"),
        (
            ["demo", "--eval-prompts", "0"],
            r"demo: error: argument --eval-prompts: must be an integer >= 1; got 0$",
        ),
        (
            ["demo", "--learning-rate=-1e-4"],  # argparse reads a lone -1e-4 as a flag
            r"argument --learning-rate: must be a finite number > 0; got -1e-4$",
        ),
        (
            ["eval", "--num-prompts", "0"],
            r"eval: error: argument --num-prompts: must be an integer >= 1; got 0$",
        ),
        (["eval", "--num-prompts", "-2", "--max-new-tokens", "1"], r"argument --num-prompts: .* got -2$"),
        (
            ["eval", "--show", "-1", "--num-prompts", "1"],
            r"argument --show: must be an integer >= 0; got -1$",
        ),
        (["eval", "--temperature", "0"], r"argument --temperature: must be a finite number > 0; got 0$"),
        (["eval", "--temperature", "nan"], r"argument --temperature: must be a finite number > 0; got nan$"),
        (
            ["collect", "--num-prompts", "-5", "--k", "1"],
            r"argument --num-prompts: must be an integer >= 1; got -5$",
        ),
        (["collect", "--k", "0"], r"collect: error: argument --k: must be an integer >= 1; got 0$"),
        (["collect", "--batch-size", "0"], r"argument --batch-size: must be an integer >= 1; got 0$"),
        (["collect", "--max-new-tokens", "0"], r"argument --max-new-tokens: must be an integer >= 1; got 0$"),
        (
            ["train-rm", "--max-length", "0"],
            r"train-rm: error: argument --max-length: must be an integer >= 1; got 0$",
        ),
        (["train-rm", "--epochs", "0"], r"argument --epochs: must be an integer >= 1; got 0$"),
        (["train-rm", "--lr", "0"], r"argument --lr: must be a finite number > 0; got 0$"),
        (
            ["benchmark", "--seeds", "0"],
            r"benchmark: error: argument --seeds: must be an integer >= 1; got 0$",
        ),
        (["benchmark", "--iterations", "0"], r"argument --iterations: must be an integer >= 1; got 0$"),
        (["benchmark", "--eval-prompts", "-1"], r"argument --eval-prompts: must be an integer >= 1; got -1$"),
        (
            ["eval", "--seed", "-1", "--num-prompts", "1"],
            r"argument --seed: must be an integer >= 0; got -1$",
        ),
        (
            ["collect", "--seed", "-1", "--num-prompts", "1"],
            r"argument --seed: must be an integer >= 0; got -1$",
        ),
        (["train-rm", "--seed", "-1"], r"argument --seed: must be an integer >= 0; got -1$"),
        (["train", "--dtype", "int8"], r"train: error: --dtype 'int8': use one of bf16, fp16, fp32$"),
        (
            ["train", "--device", "gpu0"],
            r"--device 'gpu0': not a torch device \(cpu, cuda, cuda:1, mps\.\.\.\)$",
        ),
        (
            ["train", "--device", "meta"],
            r"--device meta: lm-gym cannot run models there; use cpu, cuda, cuda:1, mps",
        ),
        (["eval", "--device", "hpu"], r"eval: error: --device hpu: lm-gym cannot run models there"),
    ],
)
def test_a_bad_flag_value_is_one_line_naming_the_flag(argv, pattern, tmp_path, prefs, capsys):
    argv = [a.format(tmp=tmp_path, prefs=prefs) for a in [*argv, *EXTRA[argv[0]]]]
    assert re.search(pattern, error_line(argv, capsys))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("command", ["train", "eval", "demo", "benchmark"])
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_on_a_machine_without_it_is_one_line(command, device, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path) for a in [command, "--device", device, *EXTRA[command]]]
    why = (
        f"torch {torch.__version__} is built without CUDA" if torch.version.cuda is None else "no CUDA device"
    )
    assert error_line(argv, capsys) == (
        f"lm-gym {command}: error: --device {device}: CUDA is not available on this machine ({why}); "
        "use --device cpu"
    )


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")
def test_mps_on_a_machine_without_it_is_one_line(tmp_path, capsys):
    message = error_line(["train", "--device", "mps", "--model", "tiny", "--run-dir", str(tmp_path)], capsys)
    assert re.search(r"--device mps: MPS is not available on this machine \(.*\); use --device cpu$", message)


CONFIG = "n_envs: 2\nmax_new_tokens: 2\n"  # keeps a run the old code let through short


@pytest.mark.parametrize(
    "text, pattern",
    [
        ("n_envs: two\n", r"config \S+\.yaml: n_envs: expected an integer; got 'two'$"),
        ("n_envs: [2, 3]\n", r"config \S+: n_envs: expected an integer; got \[2, 3\]$"),
        ("n_envs: 2.5\n", r"config \S+: n_envs: expected an integer; got 2\.5$"),
        ("n_envs: null\n", r"config \S+: n_envs: expected an integer; got None$"),
        (CONFIG + "learning_rate: [0.1]\n", r"config \S+: learning_rate: expected a number; got \[0\.1\]$"),
        (CONFIG + "learning_rate: fast\n", r"config \S+: learning_rate: expected a number; got 'fast'$"),
        (
            CONFIG + "whiten_rewards: maybe\n",
            r"config \S+: whiten_rewards: expected true or false; got 'maybe'$",
        ),
        (CONFIG + "whiten_rewards: 1\n", r"config \S+: whiten_rewards: expected true or false; got 1$"),
        (CONFIG + "lr_schedule: true\n", r"config \S+: lr_schedule: expected a string; got True$"),
        (CONFIG + "iterations: 0\n", r"config \S+: iterations: must be an integer >= 1; got 0$"),
        (
            CONFIG + "algo: sarsa\n",
            r"config \S+: algo: expected one of a2c, grpo, nlpo, ppo, reinforce_pp, rloo, trpo; got 'sarsa'$",
        ),
        (CONFIG + "task: imdb\n", r"config \S+: task: expected one of .*sentiment.*; got 'imdb'$"),
        (CONFIG + "clip-range: {a: 1}\n", r"config \S+: clip_range: expected a number; got \{'a': 1\}$"),
        (
            "n_envs: 2\n  bad: [\n",
            r"config \S+: not valid YAML: mapping values are not allowed here \(line 2, column 6\)$",
        ),
        ("n_envs: [2\n", r"config \S+: not valid YAML: .*\(line \d+, column \d+\)$"),
        ("- n_envs\n- 2\n", r"config \S+: expected a mapping of hyperparameter names to values$"),
    ],
)
def test_a_bad_config_value_is_one_line_naming_the_file_and_key(text, pattern, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(text)
    argv = ["train", "--model", "tiny", "--config", str(config), "--run-dir", str(tmp_path / "r"), "--quiet"]
    assert re.search(r"^lm-gym train: error: " + pattern, error_line([*argv, "--iterations", "1"], capsys))


def test_a_broken_json_config_or_a_folder_is_one_line(tmp_path, capsys):
    config = tmp_path / "run.json"
    config.write_text('{"n_envs": 2,')
    base = ["train", "--model", "tiny", "--run-dir", str(tmp_path / "r"), "--config"]
    message = error_line([*base, str(config)], capsys)
    assert re.search(rf"config {re.escape(str(config))}: not valid JSON: .*line 1 column \d+", message)
    message = error_line([*base, str(tmp_path)], capsys)
    assert message.startswith("lm-gym train: error: ") and "Is a directory" in message


@pytest.mark.parametrize(
    "text, pattern",
    [
        ("ppo: {n_epochs: two}\n", r"config \S+: ppo: n_epochs: expected an integer; got 'two'$"),
        ("ppo: 3\n", r"config \S+: ppo: expected a mapping of its settings; got 3$"),
        ("learning_rate: [1]\n", r"config \S+: learning_rate: expected a number; got \[1\]$"),
    ],
)
def test_a_bad_benchmark_config_is_one_line_naming_the_file_and_key(text, pattern, tmp_path, capsys):
    config = tmp_path / "bench.yaml"
    config.write_text(text)
    argv = ["benchmark", "--algos", "ppo", "--config", str(config), "--out", str(tmp_path), "--report-only"]
    assert re.search(r"^lm-gym benchmark: error: " + pattern, error_line(argv, capsys))


def test_config_values_are_typed_by_the_flag_of_their_name(tmp_path):
    from algorithms.flags import load_config

    flags = build_parser().parse_args(["train"]).flags
    config = tmp_path / "run.yaml"
    config.write_text(
        "learning_rate: 1e-4\n"  # a string to PyYAML (YAML 1.1 wants a dot): the float 1e-4
        "iterations: '2'\n"
        "n-envs: 4\n"
        "top_p: 1\n"
        "whiten_rewards: true\n"
        "normalize_advantage: false\n"
        "kl_target: null\n"  # float | None
        "keep_checkpoints: null\n"  # int | None, default 2: None keeps them all
        "lora_target_modules: [q_proj, v_proj]\n"  # str | list[str]
        "algo: a2c\n"
        "model: tiny\n"
        "learning_rat: 0.1\n"  # no flag of that name: kept as it is, for train to refuse
    )
    typed = load_config(str(config), flags)
    assert typed == {
        "learning_rate": 1e-4,
        "iterations": 2,
        "n_envs": 4,
        "top_p": 1.0,
        "whiten_rewards": True,
        "normalize_advantage": False,
        "kl_target": None,
        "keep_checkpoints": None,
        "lora_target_modules": ["q_proj", "v_proj"],
        "algo": "a2c",
        "model": "tiny",
        "learning_rat": 0.1,
    }
    assert type(typed["learning_rate"]) is float and type(typed["top_p"]) is float
    assert type(typed["iterations"]) is int
    config = tmp_path / "run.json"
    config.write_text('{"n_envs": "2", "learning_rate": "3e-5", "kl_target": null}')
    assert load_config(str(config), flags) == {"n_envs": 2, "learning_rate": 3e-5, "kl_target": None}


def test_train_takes_yaml_numbers_that_yaml_reads_as_strings(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        "learning_rate: 1e-4\niterations: '1'\nn_envs: '2'\nmax_new_tokens: 2\nkeep_checkpoints: null\n"
    )
    run = tmp_path / "run"
    main(["train", "--model", "tiny", "--config", str(config), "--run-dir", str(run), "--quiet"])
    settings = json.loads((run / "config.json").read_text())
    assert (
        settings["learning_rate"] == 1e-4 and settings["n_envs"] == 2 and settings["keep_checkpoints"] is None
    )
    assert [json.loads(line)["iteration"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1]


@pytest.mark.parametrize(
    "error, line",
    [
        (TypeError("n_envs must be an int, not str"), "n_envs must be an int, not str"),
        (
            PermissionError(errno.EACCES, "Permission denied", "/runs/x"),
            "[Errno 13] Permission denied: '/runs/x'",
        ),
        (IsADirectoryError(errno.EISDIR, "Is a directory", "prefs"), "[Errno 21] Is a directory: 'prefs'"),
        (OSError(errno.ENOSPC, "No space left on device"), "[Errno 28] No space left on device"),
        (ModuleNotFoundError("No module named 'peft'"), "No module named 'peft'"),
        (
            NonFiniteLossError("stopped: non-finite losses\nin 3 iterations"),
            "stopped: non-finite losses in 3 iterations",
        ),
        (
            ValueError("model 'x' is not:\n  - a folder\n  - a Hub id\n"),
            "model 'x' is not: - a folder - a Hub id",
        ),
        (ValueError(), "ValueError"),
    ],
)
def test_an_error_a_user_can_cause_is_one_line(error, line, monkeypatch, capsys):
    def fail(args):
        raise error

    monkeypatch.setattr(cli, "evaluate_cmd", fail)
    assert error_line(["eval"], capsys) == f"lm-gym eval: error: {line}"


@pytest.mark.parametrize("argv", [["--debug", "eval"], ["eval", "--debug"]])
def test_debug_raises_the_error_with_its_traceback(argv, monkeypatch):
    def fail(args):
        raise TypeError("the bug")

    monkeypatch.setattr(cli, "evaluate_cmd", fail)
    with pytest.raises(TypeError, match="the bug"):
        main(argv)


@pytest.mark.parametrize("error", [KeyboardInterrupt(), RuntimeError("a bug of ours")])
def test_an_interrupt_or_a_bug_is_not_swallowed(error, monkeypatch):
    def fail(args):
        raise error

    monkeypatch.setattr(cli, "evaluate_cmd", fail)
    with pytest.raises(type(error)):
        main(["eval"])
