"""Data parallel on 2 CPU processes (Gloo): one update (PPO, TRPO, GRPO, REINFORCE++, SFT, the reward
model) equals one process's on the whole batch; the CLI trains under `accelerate launch`, writes one set of
logs and checkpoints, and resumes under `torchrun`; sft, train-rm and the pipeline run under it too."""

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from algorithms.common.checkpoints import latest_checkpoint
from algorithms.common.critic_free import GroupRollout
from algorithms.common.distributed import ProcessGroup
from algorithms.grpo import GRPO
from algorithms.pipeline import _collect_sharded
from algorithms.policy import LMActorCriticPolicy
from algorithms.ppo import PPO
from algorithms.presets import PIPELINE_PRESETS
from algorithms.reinforce_pp import REINFORCEPP
from algorithms.reward_model import train_reward_model
from algorithms.sft import SFT, Demonstration
from algorithms.trpo import TRPO
from lm_gym.models import tiny_causal_lm
from lm_gym.preferences import AnnotatorPanel, PreferenceRecord, collect_preferences
from lm_gym.preferences.data import write_jsonl
from lm_gym.rewards import LowercaseShare
from lm_gym.tasks import get_task

N_ENVS = 4  # the whole batch; each of the 2 processes holds half of the envs
FIELDS = (
    "actions",
    "log_probs",
    "values",
    "rewards",
    "dones",
    "advantages",
    "returns",
)
ROOT = Path(__file__).resolve().parents[3]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ppo(n_envs: int, algo_name: str = "ppo") -> PPO:
    model, tokenizer = tiny_causal_lm(seed=0)
    policy = LMActorCriticPolicy(model, tokenizer)
    settings = dict(prompts=["Hello", "The film", "Wow", "It was"], reward=LowercaseShare(), max_new_tokens=5)
    if algo_name == "trpo":  # one actor step from averaged gradients, HVPs and line-search values
        algo = TRPO(
            policy, n_envs=n_envs, batch_size=64, target_kl=0.05, n_critic_updates=2, verbose=0, **settings
        )
    else:  # one minibatch per process and epoch (batch_size >= its segments), two epochs: two steps
        algo = PPO(policy, n_envs=n_envs, n_epochs=2, batch_size=64, verbose=0, **settings)
    # SGD, so that the update is linear in the gradient: the mean of the halves' gradients is the whole
    # batch's up to rounding (Adam's first step, g / (|g| + eps), turns rounding in tiny gradients into
    # differences of order lr)
    algo.optimizer = torch.optim.SGD(algo.optimizer.param_groups[0]["params"], lr=1.0)
    return algo


def _train_on(algo: PPO, arrays: dict[str, np.ndarray], envs: slice) -> dict[str, torch.Tensor]:
    """Run PPO's update on the given envs' columns of a fixed rollout; return the trained parameters."""
    for name in FIELDS:
        setattr(algo.buffer, name, arrays[name][:, envs].copy())
    for key in algo.buffer.observations:  # input_ids, attention_mask
        algo.buffer.observations[key] = arrays[key][:, envs].copy()
    algo.train()
    return {k: v.clone() for k, v in algo.policy.trainable_state_dict().items()}


def _worker(
    rank: int, port: int, folder: str, algo_name: str = "ppo", micro_batch_size: int | None = None
) -> None:
    """Train this process's half of the saved rollout; a ``micro_batch_size`` means a critic-free method."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank))
    os.environ["WORLD_SIZE"] = "2"
    torch.set_num_threads(1)
    critic_free = micro_batch_size is not None
    # joins the process group
    algo = (
        _critic_free(N_ENVS // 2, algo_name, micro_batch_size)
        if critic_free
        else _ppo(N_ENVS // 2, algo_name)
    )
    assert algo.world_size == 2 and algo.rank == rank
    arrays = dict(np.load(Path(folder) / "rollout.npz"))
    half = N_ENVS // 2
    train = _train_critic_free_on if critic_free else _train_on
    params = train(algo, arrays, slice(rank * half, (rank + 1) * half))
    torch.save(params, Path(folder) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("algo_name", ["ppo", "trpo"])
def test_two_process_update_equals_one_process_on_the_whole_batch(tmp_path, algo_name):
    """Each env holds n_steps actions, so the halves are equal-size: the mean of their mean losses is the
    whole batch's, with advantages whitened by the global mean and std (TRPO: its gradient, Fisher products
    and line-search surrogate and KL are such means too)."""
    single = _ppo(N_ENVS, algo_name)
    initial = {k: v.clone() for k, v in single.policy.trainable_state_dict().items()}
    single.collect_rollouts()
    arrays = {name: copy.deepcopy(getattr(single.buffer, name)) for name in FIELDS}
    arrays |= {key: array.copy() for key, array in single.buffer.observations.items()}
    np.savez(tmp_path / "rollout.npz", **arrays)
    expected = _train_on(single, arrays, slice(None))
    single.close()

    mp.spawn(_worker, args=(_free_port(), str(tmp_path), algo_name), nprocs=2)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    moved = max(float((expected[k] - initial[k]).abs().max()) for k in expected)
    assert moved > 1e-3  # the update is not trivial
    for name, value in expected.items():
        # measured: equal under 4 CPU kernel settings (docs/testing.md)
        torch.testing.assert_close(rank0[name], rank1[name], rtol=0, atol=0)  # every process: same weights
        if algo_name == "ppo":
            # measured: |diff| <= 6.0e-08 (relative 2.9e-02) under 4 CPU kernel settings (docs/testing.md)
            torch.testing.assert_close(rank0[name], value, rtol=1e-4, atol=1e-6)
        else:  # conjugate gradient amplifies rounding: the same step to 2% of its largest entry
            step, expected_step = rank0[name] - initial[name], value - initial[name]
            atol = max(0.02 * float(expected_step.abs().max()), 1e-7)
            # measured: |diff| <= 8.8e-05 (relative 2.1e+293) under 4 CPU kernel settings (docs/testing.md)
            torch.testing.assert_close(step, expected_step, rtol=0, atol=atol)


def _launch(launcher: list[str], run_dir: Path, iterations: int, *extra: str) -> None:
    args = ["--model", "tiny", "--reward", "lowercase", "--n-envs", "2", "--max-new-tokens", "4"]
    args += ["--n-epochs", "1", "--checkpoint-every", "1", "--quiet", "--run-dir", str(run_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [*launcher, "-m", "algorithms.cli", "train", *args, "--iterations", str(iterations), *extra]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_cli_trains_under_accelerate_launch_and_resumes(tmp_path):
    run = tmp_path / "run"
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    accelerate += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    _launch([*accelerate, "--main_process_port", str(_free_port())], run, 2)
    # one set of outputs, written by the main process: one TensorBoard file, one line per iteration
    assert len(list((run / "tensorboard").iterdir())) == 1
    assert [json.loads(line)["iteration"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [
        1,
        2,
    ]
    config = json.loads((run / "config.json").read_text())
    assert config["processes"] == 2 and config["n_envs"] == 2
    state = json.loads((run / "checkpoints" / "iter_000002" / "state.json").read_text())
    assert (
        state["world_size"] == 2 and state["num_timesteps"] == 2 * 2 * 4 * 2
    )  # iterations x procs x envs x steps
    assert len(state["torch_rng_by_process"]) == 2  # each process's RNG state, restored by its own process
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert history[0]["rollout/episodes"] == 4  # 2 envs in each of 2 processes

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    _launch(torchrun, run, 3, "--resume")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == [1, 2, 3]
    assert (run / "checkpoints" / "latest").read_text() == "iter_000003"
    assert (run / "final" / "model.safetensors").exists()


@pytest.mark.parametrize("variable", ["ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP"])
def test_sharded_launch_configs_are_refused(tiny, monkeypatch, variable):
    monkeypatch.setenv(variable, "true")
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="not supported: lm-gym replicates the model"):
        PPO(LMActorCriticPolicy(copy.deepcopy(model), tokenizer), prompts=["Hi"], n_envs=1, verbose=0)


# ---------------------------------------------------------------------------------------------- SFT, reward model
def _join(rank: int, port: int) -> ProcessGroup:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank))
    os.environ["WORLD_SIZE"] = "2"
    torch.set_num_threads(1)
    group = ProcessGroup("cpu")
    assert group.world_size == 2 and group.rank == rank
    return group


def _spawned(job: str, folder: Path) -> tuple[dict, dict]:
    """Run ``job`` in 2 processes; return what each saved."""
    mp.spawn(_job_worker, args=(_free_port(), str(folder), job), nprocs=2)
    return tuple(torch.load(folder / f"rank{r}.pt", weights_only=False) for r in (0, 1))


def _job_worker(rank: int, port: int, folder: str, job: str) -> None:
    _join(rank, port)
    torch.save(JOBS[job](), Path(folder) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


SFT_DEMOS = [  # one whole text: the processes' shares hold different numbers of target tokens
    Demonstration("The film opens on", " a sunny beach. Wonderful."),
    Demonstration("A slow", " but lovely film."),
    Demonstration("", "A whole text: every token is a target. Wonderful."),
    Demonstration("Critics have been kind to", " this gem."),
    Demonstration("I expected very little, but", " it was great. Wonderful, wonderful."),
    Demonstration("The cast", " is superb."),
]


def _sft_job() -> dict:
    """Two steps: a batch of 5 (shares of 2 and 3) and one of 1 (rank 0's share is empty)."""
    model, tokenizer = tiny_causal_lm(seed=0)
    trainer = SFT(model, tokenizer, epochs=1, batch_size=5, learning_rate=1e-3, max_length=64, verbose=0)
    result = trainer.learn(SFT_DEMOS, eval_data=SFT_DEMOS[:3])
    return {
        "params": {k: v.clone() for k, v in trainer.model.state_dict().items()},
        "metrics": result.metrics,
    }


def _rm_records() -> list[PreferenceRecord]:
    """Prompts with 1 to 3 pairs (a batch splits a prompt's pairs across processes), vote shares, margins."""
    rng = np.random.default_rng(0)
    words = ["the", "plot", "film", "slow", "cast", "long", "music", "ends"]
    return [
        PreferenceRecord(
            f"Review {n}:",
            " " + " ".join(rng.choice(words, size=3)) + " zap",
            " " + " ".join(rng.choice(words, size=4)),
            margin=0.5 if n % 2 else None,
            agreement=(1.0, 0.8, 0.6)[j],
        )
        for n in range(10)
        for j in range(1 + n % 3)
    ]


def _rm_job() -> dict:
    """One epoch of 16 training pairs in batches of 5: four steps, the last of 1 pair (rank 0 has none)."""
    result = train_reward_model(
        _rm_records(),
        model="tiny",
        epochs=1,
        batch_size=5,
        learning_rate=1e-3,
        center_coef=0.01,
        eval_fraction=0.2,
        gold=lambda prompts, completions: np.array([float("zap" in c) for c in completions]),
        device="cpu",
        log=None,
    )
    return {"params": {k: v.clone() for k, v in result.model.state_dict().items()}, "metrics": result.metrics}


def _rm_job_initial() -> dict:
    from algorithms.reward_model import _load

    with torch.random.fork_rng(devices=[]):
        model, _ = _load("tiny", None, 0, "cpu")
    return {k: v.clone() for k, v in model.state_dict().items()}


def _rm_resume_job(folder: Path, phase: str) -> dict:
    """``crash``: an uninterrupted 2-epoch run, then a run that crashes in its second epoch (every process at
    the same step, as a killed job); ``resume``: fresh processes continue the crashed run from its checkpoint."""
    import algorithms.reward_model as rm_module

    settings = dict(model="tiny", epochs=2, batch_size=5, learning_rate=1e-3, center_coef=0.01)
    settings.update(eval_fraction=0.2, device="cpu", log=None)
    if phase == "resume":
        result = train_reward_model(_rm_records(), checkpoint_dir=folder / "run", resume=True, **settings)
    else:
        result = train_reward_model(_rm_records(), checkpoint_dir=folder / "whole", **settings)
        real, calls = rm_module.bradley_terry_loss, []

        def crashing(*args, **kwargs):
            calls.append(1)
            if len(calls) == 6:  # 4 steps an epoch: the second step of epoch 2
                raise RuntimeError("simulated crash")
            return real(*args, **kwargs)

        rm_module.bradley_terry_loss = crashing
        try:
            train_reward_model(_rm_records(), checkpoint_dir=folder / "run", **settings)
        except RuntimeError:
            pass
        finally:
            rm_module.bradley_terry_loss = real
    params = {k: v.clone() for k, v in result.model.state_dict().items()}
    return {
        "params": params,
        "history": [{k: v for k, v in h.items() if k != "time/elapsed_s"} for h in result.history],
    }


def _resume_worker(rank: int, port: int, folder: str, phase: str) -> None:
    _join(rank, port)
    torch.save(_rm_resume_job(Path(folder), phase), Path(folder) / f"{phase}{rank}.pt")
    torch.distributed.destroy_process_group()


def _collect_job() -> dict:
    """Sampling shared out by batch: 30 prompts x k=3 are a batch of 21 prompts and one of 9."""
    model, tokenizer = tiny_causal_lm(seed=0)
    prompts = [f"Prompt {i}" for i in range(30)]
    panel = AnnotatorPanel(get_task("letters").make_reward(), seed=0)
    settings = dict(k=3, max_new_tokens=4, seed=5)
    if torch.distributed.is_initialized():
        collection = _collect_sharded(ProcessGroup("cpu"), model, tokenizer, prompts, panel, **settings)
    else:
        collection = collect_preferences(model, tokenizer, prompts, panel, **settings)
    return {"records": [r.to_json() for r in collection.records], "stats": collection.stats}


JOBS = {"sft": _sft_job, "rm": _rm_job, "collect": _collect_job}


def _assert_same_update(
    single: dict, rank0: dict, rank1: dict, initial: dict, metrics: tuple[str, ...]
) -> None:
    """Every process holds the same weights, those of one process on the whole batch, and reports the same
    ``metrics`` as that one process."""
    moved = max(float((single["params"][k] - initial[k]).abs().max()) for k in initial)
    assert moved > 1e-4  # the update is not trivial
    for name, value in single["params"].items():
        # measured: equal under 4 CPU kernel settings (docs/testing.md)
        torch.testing.assert_close(rank0["params"][name], rank1["params"][name], rtol=0, atol=0)
        # measured: |diff| <= 2.7e-06 (relative 2.3e-01) under 4 CPU kernel settings (docs/testing.md)
        torch.testing.assert_close(rank0["params"][name], value, rtol=1e-4, atol=1e-5)  # max diff ~1e-6
    for key in metrics:
        assert (
            # measured: |diff| <= 9.5e-07 (relative 1.7e-07) under 4 CPU kernel settings (docs/testing.md)
            rank0["metrics"][key] == rank1["metrics"][key] == pytest.approx(single["metrics"][key], rel=1e-5)
        )


@pytest.mark.slow
def test_sft_two_process_update_equals_one_process_on_the_whole_batch(tmp_path):
    """The loss is normalised by the global batch's target tokens, so the averaged gradient is the whole
    batch's mean even though the shares hold different token counts; the eval loss is reduced."""
    initial = {k: v.clone() for k, v in tiny_causal_lm(seed=0)[0].state_dict().items()}
    single = _sft_job()
    rank0, rank1 = _spawned("sft", tmp_path)
    metrics = ("train/loss", "train/grad_norm", "eval/loss_initial", "eval/loss", "train/steps")
    _assert_same_update(single, rank0, rank1, initial, metrics)


@pytest.mark.slow
def test_reward_model_two_process_update_equals_one_process_on_the_whole_batch(tmp_path):
    """Bradley-Terry with margins, vote shares and the centering term: the shares' losses weighted by their
    pairs make the averaged gradient the whole batch's; the metrics are the global ones."""
    initial = _rm_job_initial()
    single = _rm_job()
    rank0, rank1 = _spawned("rm", tmp_path)
    metrics = ("train/loss", "train/accuracy", "eval/accuracy", "eval/pairs", "data/train_pairs")
    _assert_same_update(single, rank0, rank1, initial, metrics)


@pytest.mark.slow
def test_reward_model_resumes_under_two_processes_as_the_uninterrupted_run(tmp_path):
    """2 processes crash in epoch 2; 2 fresh ones resume from the epoch-1 checkpoint (each process its own RNG
    state) and end with the uninterrupted 2-process run's weights and history."""
    mp.spawn(_resume_worker, args=(_free_port(), str(tmp_path), "crash"), nprocs=2)
    state = json.loads((latest_checkpoint(tmp_path / "run") / "state.json").read_text())
    assert state["epoch"] == 1 and state["world_size"] == 2 and len(state["torch_rng_by_process"]) == 2
    mp.spawn(_resume_worker, args=(_free_port(), str(tmp_path), "resume"), nprocs=2)
    whole, resumed = (
        [torch.load(tmp_path / f"{phase}{r}.pt") for r in (0, 1)] for phase in ("crash", "resume")
    )
    assert (
        whole[0]["history"] == resumed[0]["history"] == resumed[1]["history"]
        and len(whole[0]["history"]) == 2
    )
    for name, value in whole[0]["params"].items():
        for got in (whole[1], resumed[0], resumed[1]):
            # measured: equal under 4 CPU kernel settings (docs/testing.md)
            torch.testing.assert_close(got["params"][name], value, rtol=0, atol=0)
    assert latest_checkpoint(tmp_path / "run").name == "epoch_000002"


@pytest.mark.slow
def test_sharded_collection_equals_one_process(tmp_path):
    single = _collect_job()
    rank0, rank1 = _spawned("collect", tmp_path)
    assert rank0 == rank1 == single and len(single["records"]) > 30


def _run_cli(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    accelerate += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    accelerate += ["--main_process_port", str(_free_port()), "-m", "algorithms.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [*accelerate, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_cli_sft_under_accelerate_launch(tmp_path):
    demos = tmp_path / "demos.jsonl"
    demos.write_text("".join(json.dumps(d._asdict()) + "\n" for d in SFT_DEMOS))
    out = tmp_path / "sft"
    done = _run_cli(
        ["sft", "--model", "tiny", "--data", str(demos), "--output-dir", str(out)]
        + ["--epochs", "2", "--batch-size", "3", "--eval-fraction", "0.3"]
    )
    # the main process alone printed the epochs and the result, and wrote the folder
    epochs = [line for line in done.stdout.splitlines() if line.startswith("epoch ")]
    assert len(epochs) == 2 and done.stdout.count("model: ") == 1
    assert done.stdout.count("done in") == 1
    report = json.loads((out / "sft_metrics.json").read_text())
    assert (
        report["metrics"]["train/examples"] == 4 and report["metrics"]["train/steps"] == 4
    )  # 2 steps an epoch
    assert (out / "model.safetensors").exists()


@pytest.mark.slow
def test_cli_train_rm_under_accelerate_launch(tmp_path):
    prefs = write_jsonl(_rm_records(), tmp_path / "prefs.jsonl")
    rm = tmp_path / "rm"
    done = _run_cli(
        ["train-rm", "--data", str(prefs), "--model", "tiny", "--out", str(rm), "--no-gold"]
        + ["--epochs", "2", "--batch-size", "5", "--eval-fraction", "0.2"]
    )
    epochs = [line for line in done.stdout.splitlines() if line.startswith("epoch ")]
    assert len(epochs) == 2 and done.stdout.count("held-out accuracy") == 1
    info = json.loads((rm / "reward_model.json").read_text())
    assert len(info["history"]) == 2 and (rm / "model.safetensors").exists()


@pytest.mark.slow
def test_cli_pipeline_under_accelerate_launch(tmp_path):
    assert PIPELINE_PRESETS["quick"]["model"] == PIPELINE_PRESETS["quick"]["rm_model"] == "tiny"
    out = tmp_path / "pipeline"
    done = _run_cli(
        ["pipeline", "--preset", "quick", "--collect-prompts", "8", "--iterations", "2", "--eval-every", "1"]
        + ["--eval-prompts", "4", "--rm-epochs", "1", "--out", str(out)]
    )
    assert done.stdout.count("RLHF pipeline: tiny on letters, PPO") == 1  # the report, printed once
    assert done.stdout.count("round 0: collecting") == 1  # the progress lines too
    report = json.loads((out / "report.json").read_text())
    assert [(q["round"], q["iteration"]) for q in report["points"]] == [(0, 0), (0, 1), (0, 2)]
    assert [row["checkpoint"] for row in report["elo"]] == ["initial", "round_0"]
    rl = out / "round_0" / "rl"
    assert json.loads((rl / "checkpoints" / "iter_000002" / "state.json").read_text())["world_size"] == 2
    assert len(list((rl / "tensorboard").iterdir())) == 1  # one writer: the main process's
    for name in ("preferences.jsonl", "reward_model/model.safetensors"):
        assert (out / "round_0" / name).exists()
    assert (out / "final" / "model.safetensors").exists() and (out / "overoptimization.png").exists()


# ---------------------------------------------------------------------------------------------- critic-free
GROUP_FIELDS = ("actions", "log_probs", "values", "rewards", "dones", "ref_log_probs")


def _critic_free(n_envs: int, algo_name: str, micro_batch_size: int) -> GRPO | REINFORCEPP:
    """GRPO with DAPO's token mean and the KL (k3) in the loss, or REINFORCE++ (advantages whitened over every
    token of the batch) with the KL in the reward; groups of 2, two epochs of one step each."""
    model, tokenizer = tiny_causal_lm(seed=0)
    policy = LMActorCriticPolicy(model, tokenizer)
    settings = dict(prompts=["Hello", "The film", "Wow", "It was"], reward=LowercaseShare(), max_new_tokens=5)
    settings |= dict(n_envs=n_envs, group_size=2, n_epochs=2, micro_batch_size=micro_batch_size, verbose=0)
    # a quarter of the vocabulary stops a text: the texts, and so the processes' token counts, differ
    settings |= dict(stop_token_ids=list(range(0, 257, 4)), kl_coef=0.05)
    if algo_name == "grpo":
        algo = GRPO(policy, aggregation="dapo", **settings)
    else:
        algo = REINFORCEPP(policy, **settings)
    algo.optimizer = torch.optim.SGD(algo.optimizer.param_groups[0]["params"], lr=1.0)  # as _ppo's
    return algo


def _train_critic_free_on(algo, arrays: dict[str, np.ndarray], envs: slice) -> dict[str, torch.Tensor]:
    """Run the update on the given envs' columns (whole groups) of a fixed rollout; return the parameters."""
    for name in GROUP_FIELDS:
        if name in arrays:  # ref_log_probs: only with the KL in the loss
            setattr(algo.buffer, name, arrays[name][:, envs].copy())
    for key in algo.buffer.observations:
        algo.buffer.observations[key] = arrays[key][:, envs].copy()
    columns = np.arange(arrays["lengths"].shape[0])[envs]
    algo.rollout = GroupRollout(
        columns - columns[0], *(arrays[k][envs].copy() for k in ("lengths", "scores", "truncated"))
    )
    algo.train()
    return {k: v.clone() for k, v in algo.policy.trainable_state_dict().items()}


@pytest.mark.slow
@pytest.mark.parametrize("algo_name, micro_batch_size", [("grpo", 8), ("grpo", 1), ("reinforce_pp", 1)])
def test_critic_free_two_process_update_equals_one_process_on_the_whole_batch(
    tmp_path, algo_name, micro_batch_size
):
    """Each process holds whole groups (2 of 4 rows): DAPO's mean over every token divides by the global
    token count and REINFORCE++ whitens by the global mean and std, though the halves hold different numbers
    of tokens; with micro_batch_size 1 each step accumulates the gradients of single texts."""
    single = _critic_free(N_ENVS, algo_name, micro_batch_size)
    initial = {k: v.clone() for k, v in single.policy.trainable_state_dict().items()}
    single.collect_rollouts()
    rollout = single.rollout
    assert rollout.columns.tolist() == list(range(N_ENVS))
    halves = [rollout.lengths[: N_ENVS // 2].sum(), rollout.lengths[N_ENVS // 2 :].sum()]
    assert halves[0] != halves[1]  # the token counts of the processes differ
    arrays = {name: getattr(single.buffer, name) for name in GROUP_FIELDS}
    arrays = {name: array.copy() for name, array in arrays.items() if array is not None}
    arrays |= {key: array.copy() for key, array in single.buffer.observations.items()}
    arrays |= {"lengths": rollout.lengths, "scores": rollout.scores, "truncated": rollout.truncated}
    np.savez(tmp_path / "rollout.npz", **arrays)
    expected = _train_critic_free_on(single, arrays, slice(None))
    single.close()

    mp.spawn(_worker, args=(_free_port(), str(tmp_path), algo_name, micro_batch_size), nprocs=2)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    moved = max(float((expected[k] - initial[k]).abs().max()) for k in expected)
    assert moved > 1e-3  # the update is not trivial
    for name, value in expected.items():
        # measured: equal under 3 CPU kernel settings (docs/testing.md)
        torch.testing.assert_close(rank0[name], rank1[name], rtol=0, atol=0)  # every process: same weights
        # measured: |diff| <= 6.0e-08 (relative 2.1e-03) under 3 CPU kernel settings (docs/testing.md)
        torch.testing.assert_close(rank0[name], value, rtol=1e-4, atol=1e-6)
