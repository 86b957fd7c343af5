"""Data parallel on 2 CPU processes (Gloo): one update equals one process's on the whole batch; the CLI
trains under `accelerate launch`, writes one set of logs and checkpoints, and resumes under `torchrun`."""

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

from algorithms.policy import LMActorCriticPolicy
from algorithms.ppo import PPO
from algorithms.trpo import TRPO
from lm_gym.models import tiny_causal_lm
from lm_gym.rewards import LowercaseShare

N_ENVS = 4  # the whole batch; each of the 2 processes holds half of the envs
FIELDS = (
    "input_ids",
    "attention_mask",
    "actions",
    "log_probs",
    "values",
    "rewards",
    "dones",
    "advantages",
    "returns",
)
ROOT = Path(__file__).resolve().parents[1]


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
    algo.train()
    return {k: v.clone() for k, v in algo.policy.trainable_state_dict().items()}


def _worker(rank: int, port: int, folder: str, algo_name: str = "ppo") -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank))
    os.environ["WORLD_SIZE"] = "2"
    torch.set_num_threads(1)
    algo = _ppo(N_ENVS // 2, algo_name)  # joins the process group
    assert algo.world_size == 2 and algo.rank == rank
    arrays = dict(np.load(Path(folder) / "rollout.npz"))
    half = N_ENVS // 2
    params = _train_on(algo, arrays, slice(rank * half, (rank + 1) * half))
    torch.save(params, Path(folder) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("algo_name", ["ppo", "trpo"])
def test_two_process_update_equals_one_process_on_the_whole_batch(tmp_path, algo_name):
    """Each env holds n_steps actions, so the halves are equal-size: the mean of their mean losses is the
    whole batch's, with advantages whitened by the global mean and std (TRPO: its gradient, Fisher products
    and line-search surrogate and KL are such means too)."""
    single = _ppo(N_ENVS, algo_name)
    initial = {k: v.clone() for k, v in single.policy.trainable_state_dict().items()}
    single.collect_rollouts()
    arrays = {name: copy.deepcopy(getattr(single.buffer, name)) for name in FIELDS}
    np.savez(tmp_path / "rollout.npz", **arrays)
    expected = _train_on(single, arrays, slice(None))
    single.close()

    mp.spawn(_worker, args=(_free_port(), str(tmp_path), algo_name), nprocs=2)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    moved = max(float((expected[k] - initial[k]).abs().max()) for k in expected)
    assert moved > 1e-3  # the update is not trivial
    for name, value in expected.items():
        torch.testing.assert_close(rank0[name], rank1[name], rtol=0, atol=0)  # every process: same weights
        if algo_name == "ppo":
            torch.testing.assert_close(rank0[name], value, rtol=1e-4, atol=1e-6)
        else:  # conjugate gradient amplifies rounding: the same step to 2% of its largest entry
            step, expected_step = rank0[name] - initial[name], value - initial[name]
            atol = max(0.02 * float(expected_step.abs().max()), 1e-7)
            torch.testing.assert_close(step, expected_step, rtol=0, atol=atol)


def _launch(launcher: list[str], run_dir: Path, iterations: int, *extra: str) -> None:
    args = ["--model", "tiny", "--reward", "lowercase", "--n-envs", "2", "--max-new-tokens", "4"]
    args += ["--n-epochs", "1", "--checkpoint-every", "1", "--quiet", "--run-dir", str(run_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [*launcher, "-m", "algorithms.cli", "train", *args, "--iterations", str(iterations), *extra]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


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
