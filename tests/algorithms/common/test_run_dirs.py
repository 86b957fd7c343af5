"""Run folders and checkpoints: a resume with other settings, a rerun into a finished run, logs after a resume,
crash leftovers, damaged checkpoints, unwritable folders and full disks, and non-finite losses and weights,
for every trainer (RL, SFT, reward model, pipeline). Each mistake ends with one line; nothing is lost."""

import errno
import json
import math
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from algorithms.cli import main
from algorithms.common.checkpoints import latest_checkpoint
from algorithms.common.distributed import ProcessGroup
from algorithms.common.logger import Logger
from algorithms.common.on_policy import NonFiniteLossError
from algorithms.common.trainer import Trainer
from algorithms.ppo import PPO
from algorithms.reward_model import RewardModelResult, save_reward_model, train_reward_model
from algorithms.sft import SFT
from lm_gym.models import tiny_causal_lm
from lm_gym.preferences import write_jsonl
from tests.algorithms.test_reward_model import _planted_records
from tests.algorithms.test_sft import DEMOS
from tests.toys import tiny_bert_classifier, toy_algo


def make_ppo(tiny, **kwargs):
    return toy_algo(PPO, tiny, **{"batch_size": 8, "n_epochs": 1, **kwargs})


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Files the commands read: demonstrations, preference records and a tiny reward-model backbone."""
    folder = tmp_path_factory.mktemp("inputs")
    demos = folder / "demos.jsonl"
    demos.write_text("".join(json.dumps(d._asdict()) + "\n" for d in DEMOS))
    prefs = write_jsonl(_planted_records(6), folder / "prefs.jsonl")
    model, tokenizer = tiny_bert_classifier()
    model.save_pretrained(folder / "backbone")
    tokenizer.save_pretrained(folder / "backbone")
    return {"demos": str(demos), "prefs": str(prefs), "backbone": str(folder / "backbone")}


def command(name: str, out: Path | str, inputs: dict[str, str]) -> list[str]:
    """A short run of ``lm-gym NAME`` writing into ``out``."""
    if name == "train":
        return ["train", "--model", "tiny", "--run-dir", str(out), "--quiet", "--iterations", "1"] + [
            "--n-envs", "2", "--max-new-tokens", "3", "--n-epochs", "1", "--checkpoint-every", "1",
        ]  # fmt: skip
    if name == "sft":
        return ["sft", "--model", "tiny", "--data", inputs["demos"], "--output-dir", str(out), "--quiet"] + [
            "--epochs", "1", "--batch-size", "2", "--learning-rate", "0.003", "--max-length", "32",
        ]  # fmt: skip
    if name == "train-rm":
        return ["train-rm", "--data", inputs["prefs"], "--model", inputs["backbone"], "--out", str(out)] + [
            "--epochs", "1", "--batch-size", "4", "--eval-fraction", "0.25", "--no-gold",
        ]  # fmt: skip
    return ["pipeline", "--preset", "quick", "--out", str(out), "--collect-prompts", "4", "--iterations", "1"] + [
        "--eval-every", "1", "--eval-prompts", "2",
    ]  # fmt: skip


FLAGS = {"train": "--run-dir", "sft": "--output-dir", "train-rm": "--out", "pipeline": "--out"}


def one_line_error(argv: list[str], match: str) -> str:
    """Run the command; it must end with a single line matching ``match``; return it."""
    with pytest.raises(SystemExit, match=match) as exit_:
        main(argv)
    message = str(exit_.value.code)
    assert message.startswith(f"lm-gym {argv[0]}: error: ") and "\n" not in message
    return message


# ---------------------------------------------------------------------------------------------- 1. settings
def test_train_resume_with_other_settings_is_refused(tmp_path, inputs):
    run = tmp_path / "run"
    base = command("train", run, inputs)
    main([*base, "--learning-rate", "0.001"])
    config = (run / "config.json").read_text()
    for changed, message in [
        (["--learning-rate", "0.002"], r"was run with learning_rate=0\.001, now 0\.002"),
        ([], r"was run with learning_rate=0\.001, now 1e-05"),  # a flag left out is its default
        (["--learning-rate", "0.001", "--kl-coef", "0.1"], r"was run with kl_coef=0\.05, now 0\.1"),
        (["--learning-rate", "0.001", "--lora-r", "4"], r"was run with lora_r=0, now 4"),
    ]:
        one_line_error([*base, *changed, "--iterations", "2", "--resume"], f"{message}: resume with the same")
    assert (run / "config.json").read_text() == config  # not overwritten by a refused resume
    same = ["--learning-rate", "0.001", "--seed", "0"]  # seed 0 is the default: the same settings
    main([*base, *same, "--iterations", "2", "--resume"])
    assert (run / "checkpoints" / "latest").read_text() == "iter_000002"


# ---------------------------------------------------------------------------------------------- 2. non-finite
@pytest.mark.parametrize("name, flag", [("sft", "--learning-rate"), ("train-rm", "--lr")])
def test_a_diverging_model_is_never_saved(tmp_path, inputs, capsys, name, flag):
    out = tmp_path / "out"
    with pytest.warns(RuntimeWarning, match="non-finite"):
        one_line_error(
            [*command(name, out, inputs), flag, "1e30", "--epochs", "3"],
            r"stopped: non-finite loss or gradient in 3 consecutive steps \(check the learning rate",
        )
    assert not (out / "config.json").exists() and not (out / "model.safetensors").exists()
    assert "use it as reward=" not in capsys.readouterr().out
    for checkpoint in (out / "checkpoints").glob("*_0*"):  # any epoch checkpoint holds finite weights
        assert all(torch.isfinite(t).all() for t in load_file(checkpoint / "model.safetensors").values())


def test_reward_model_margin_must_be_finite():
    with pytest.raises(ValueError, match="margin must be a finite number; got nan"):
        train_reward_model(_planted_records(2), model="unused", margin=float("nan"))


def _nan_ppo(tiny, tmp_path):
    algo = make_ppo(tiny, run_dir=tmp_path)
    with torch.no_grad():
        algo.policy.value_head.weight.fill_(float("nan"))
    return algo


def _nan_sft(tiny, tmp_path):
    trainer = SFT(*tiny_causal_lm(seed=0), verbose=0)
    with torch.no_grad():
        next(trainer.model.parameters()).view(-1)[0] = float("inf")
    return trainer


WRITERS = {  # every path that writes weights, given weights holding NaN or inf
    "training state": lambda tiny, tmp: _nan_trainer_checkpoint(tmp),
    "RL checkpoint": lambda tiny, tmp: _nan_ppo(tiny, tmp).save_checkpoint(),
    "RL export": lambda tiny, tmp: _nan_ppo(tiny, tmp).learn(0),
    "SFT export": lambda tiny, tmp: _nan_sft(tiny, tmp).save_pretrained(tmp / "model"),
    "reward model export": lambda tiny, tmp: save_reward_model(_nan_reward_model(), tmp / "model"),
}


def _nan_reward_model() -> RewardModelResult:
    model, tokenizer = tiny_bert_classifier()
    with torch.no_grad():
        model.classifier.bias.fill_(math.nan)
    return RewardModelResult(model, tokenizer, {}, [])


def _nan_trainer_checkpoint(tmp: Path) -> Path:
    """A checkpoint of the trainer skeleton that SFT and the reward model share, of weights holding NaN."""
    w = torch.nn.Parameter(torch.tensor([1.0, math.nan]))
    return Trainer([w], ProcessGroup(), learning_rate=1e-3).save(tmp, "step_000002", {"w": w}, {}, keep=None)


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_weights_that_hold_nan_or_inf_are_never_written(tiny, tmp_path, writer):
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(ValueError, match=r"not written: 1 weight tensor\(s\) hold NaN or inf"):
        WRITERS[writer](tiny, tmp_path)
    left = sorted(p.name for p in tmp_path.rglob("*"))
    assert left in (before, ["checkpoints"])  # nothing, or an empty folder for the checkpoints


# ---------------------------------------------------------------------------------------------- 3a. reruns
@pytest.mark.parametrize("name", ["train", "sft", "train-rm"])
def test_a_rerun_into_a_finished_run_is_refused_and_overwrite_replaces_it(tmp_path, inputs, name):
    out = tmp_path / "out"
    argv = command(name, out, inputs)
    main(argv)
    stale = out / "checkpoints" / "step_000099"  # a checkpoint of the earlier run only
    stale.mkdir()
    first = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    one_line_error(
        argv, f"{FLAGS[name]} {re.escape(str(out))} holds a run already: continue it with --resume"
    )
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == first  # untouched
    one_line_error([*argv, "--resume", "--overwrite"], "--resume and --overwrite exclude each other")
    main([*argv, "--overwrite"])
    assert not stale.exists() and latest_checkpoint(out / "checkpoints") is not None


def test_a_pipeline_rerun_into_a_finished_run_is_refused_and_overwrite_replaces_it(tmp_path, inputs):
    out = tmp_path / "out"
    (out / "round_7").mkdir(parents=True)  # what an earlier run left
    (out / "pipeline_state.json").write_text("{}")
    argv = command("pipeline", out, inputs)
    one_line_error(argv, f"--out {re.escape(str(out))} holds a run already: continue it with --resume")
    assert (out / "round_7").exists()
    main([*argv, "--overwrite"])
    assert not (out / "round_7").exists() and (out / "report.md").exists()


# ---------------------------------------------------------------------------------------------- 3b. logs
def test_a_resume_truncates_the_logs_to_its_checkpoint(tiny, tmp_path, monkeypatch):
    whole = make_ppo(tiny, run_dir=tmp_path / "whole", checkpoint_every=2, sample_every=1)
    whole.learn(4)
    run = tmp_path / "run"
    crashing = make_ppo(tiny, run_dir=run, checkpoint_every=2, sample_every=1)
    real_collect = crashing.collect_rollouts

    def crash_in_iteration_4():  # iteration 3 is logged, not checkpointed
        if crashing.iteration == 3:
            raise RuntimeError("simulated crash")
        return real_collect()

    monkeypatch.setattr(crashing, "collect_rollouts", crash_in_iteration_4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashing.learn(4)
    crashing.close()
    resumed = make_ppo(tiny, run_dir=run, checkpoint_every=2, sample_every=1)
    resumed.load_checkpoint(run)
    assert resumed.iteration == 2
    resumed.learn(4)
    resumed.close()
    whole.close()

    def rows(folder):
        return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]

    untimed = lambda r: {k: v for k, v in r.items() if not k.startswith("time/")}  # noqa: E731
    assert [untimed(r) for r in rows(run)] == [untimed(r) for r in rows(tmp_path / "whole")]
    assert [r["iteration"] for r in rows(run)] == [1, 2, 3, 4]
    samples = (run / "samples.md").read_text()
    assert samples == (tmp_path / "whole" / "samples.md").read_text()
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    scores = [(e.step, e.value) for e in events.Scalars("rollout/rm_score")]
    # measured: equal under 4 CPU kernel settings (docs/testing.md)
    assert scores == [(r["iteration"], pytest.approx(r["rollout/rm_score"])) for r in rows(run)]


# ---------------------------------------------------------------------------------------------- 3c. crashes
def test_what_a_crashed_write_left_is_removed_when_the_run_resumes(tmp_path, inputs):
    run = tmp_path / "run"
    argv = command("train", run, inputs)
    main(argv)
    leftovers = [
        run / "checkpoints" / f".staging_iter_000002_{os.getpid() + 1}",
        run / f".staging_final_{os.getpid() + 1}",
    ]
    for folder in leftovers:
        folder.mkdir()
        (folder / "policy.safetensors").write_bytes(b"half")
    (run / "checkpoints" / "latest.tmp").write_text("iter_0")
    main([*argv, "--iterations", "2", "--resume"])
    assert not any(p.exists() for p in leftovers) and not (run / "checkpoints" / "latest.tmp").exists()
    assert latest_checkpoint(run / "checkpoints").name == "iter_000002"


# ---------------------------------------------------------------------------------------------- 3d. damage
DAMAGE = {
    "truncated weights": lambda folder: (folder / "policy.safetensors").write_bytes(
        (folder / "policy.safetensors").read_bytes()[:100]
    ),
    "missing optimizer": lambda folder: (folder / "optimizer.pt").unlink(),
    "unreadable manifest": lambda folder: (folder / "manifest.json").write_text("{"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(tiny, tmp_path, damage):
    algo = make_ppo(tiny, run_dir=tmp_path, checkpoint_every=1)
    algo.learn(2)
    DAMAGE[damage](tmp_path / "checkpoints" / "iter_000002")
    resumed = make_ppo(tiny, run_dir=tmp_path)
    with pytest.warns(
        RuntimeWarning, match=r"damaged checkpoint\(s\) passed over \(iter_000002: .*\): resuming"
    ):
        resumed.load_checkpoint(tmp_path)
    assert resumed.iteration == 1
    expected = load_file(tmp_path / "checkpoints" / "iter_000001" / "policy.safetensors")
    for name, value in resumed.policy.trainable_state_dict().items():
        assert torch.equal(value, expected[name]), name
    DAMAGE[damage](tmp_path / "checkpoints" / "iter_000001")
    with (
        pytest.warns(RuntimeWarning, match="no intact checkpoint is left"),
        pytest.raises(FileNotFoundError, match="no checkpoint"),
    ):
        make_ppo(tiny, run_dir=tmp_path).load_checkpoint(tmp_path)


# ---------------------------------------------------------------------------------------------- 3e. folders
@pytest.fixture
def read_only(tmp_path, monkeypatch):
    """A folder no file can be created in (root ignores the mode bits, so creating one is refused too)."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    real_open = os.open

    def refusing_open(path, flags, *args, **kwargs):
        writes = flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
        if writes and Path(os.fsdecode(path)).resolve().is_relative_to(folder.resolve()):
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing_open)
    yield folder
    folder.chmod(0o755)


@pytest.mark.parametrize("name", sorted(FLAGS))
@pytest.mark.parametrize("case", ["a file", "read-only", "empty"])
def test_an_unusable_run_folder_gives_one_line(tmp_path, inputs, read_only, monkeypatch, name, case):
    monkeypatch.chdir(tmp_path)  # "" is the working directory to a run that takes it
    flag = FLAGS[name]
    folder = {"a file": tmp_path / "file", "read-only": read_only, "empty": ""}[case]
    if case == "a file":
        folder.write_text("not a folder")
    expected = {
        "a file": f"{flag} {re.escape(str(folder))} is a file: name a folder",
        "read-only": rf"{flag} {re.escape(str(folder))} cannot be written \(Permission denied\)",
        "empty": f"{flag} is empty: name the folder of the run",
    }[case]
    one_line_error(command(name, folder, inputs), expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["file"] * (case == "a file") + ["read_only"])


def test_a_full_disk_gives_one_line_and_keeps_the_checkpoints(tmp_path, inputs, monkeypatch):
    import safetensors.torch

    run = tmp_path / "run"
    argv = command("train", run, inputs)
    main([*argv, "--iterations", "2"])
    kept = {p: p.read_bytes() for p in (run / "checkpoints").rglob("*") if p.is_file()}

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(safetensors.torch, "save_file", full_disk)
        one_line_error(
            [*argv, "--iterations", "4", "--resume"],
            re.escape(
                f"{run / 'checkpoints' / 'iter_000003'} not written (No space left on device); what was"
            ),
        )
    assert {p: p.read_bytes() for p in (run / "checkpoints").rglob("*") if p.is_file()} == kept
    main([*argv, "--iterations", "3", "--resume"])  # once there is room again
    rows = [json.loads(line)["iteration"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows == [1, 2, 3]


# ---------------------------------------------------------------------------------------------- 4. the stop
def test_a_non_finite_stop_leaves_a_checkpoint_of_the_last_finite_weights(tiny, tmp_path):
    algo = make_ppo(tiny, run_dir=tmp_path, max_nonfinite=2)  # checkpoint_every=10: none before the stop
    before = {k: v.clone() for k, v in algo.policy.trainable_state_dict().items()}
    algo.policy.value_head.register_forward_hook(lambda module, args, out: out * math.nan)  # every loss NaN
    checkpoint = tmp_path / "checkpoints" / "iter_000002"
    kept = re.escape(f"the weights hold the last finite update, and so does the checkpoint {checkpoint}")
    with (
        pytest.warns(RuntimeWarning, match="non-finite"),
        pytest.raises(NonFiniteLossError, match=f"2 consecutive iterations .*; {kept}$"),
    ):
        algo.learn(5)
    assert latest_checkpoint(tmp_path / "checkpoints") == checkpoint
    resumed = make_ppo(tiny)
    resumed.load_checkpoint(tmp_path)
    assert resumed.iteration == 2
    for name, value in resumed.policy.trainable_state_dict().items():
        assert torch.isfinite(value).all() and torch.equal(value, before[name]), name


def test_a_nan_metric_is_logged_not_dropped(tmp_path):
    """An undefined metric (explained variance of constant returns) is a NaN point in TensorBoard, so the key
    does not vanish from the run (issue 15)."""
    logger = Logger(tmp_path, verbose=0)
    logger.record("train/explained_variance", float("nan"))
    logger.record("train/loss", 1.5)
    logger.dump(1)
    logger.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert math.isnan(events.Scalars("train/explained_variance")[0].value)
    assert events.Scalars("train/loss")[0].value == 1.5
