"""One RL run from names, what ``lm-gym train`` does: load the model, build the algorithm, train, export.

The run's folder gets ``config.json`` (the settings that decide the run's course), the logs, the checkpoints
and the final model; resuming it with other settings is refused.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from algorithms.a2c import A2C
from algorithms.common.checkpoints import check_same_settings, prepare_run_dir
from algorithms.common.on_policy import OnPolicyAlgorithm
from algorithms.flags import DTYPES, device_and_dtype, parameters
from algorithms.grpo import GRPO
from algorithms.nlpo import NLPO
from algorithms.policy import LMActorCriticPolicy
from algorithms.ppo import PPO
from algorithms.reinforce_pp import REINFORCEPP
from algorithms.rloo import RLOO
from algorithms.trpo import TRPO
from lm_gym.env import DEFAULT_MODEL

__all__ = ["ALGORITHMS", "RECIPES", "run_training"]

ALGORITHMS: dict[str, type[OnPolicyAlgorithm]] = {
    "ppo": PPO,
    "a2c": A2C,
    "trpo": TRPO,
    "nlpo": NLPO,
    "grpo": GRPO,
    "rloo": RLOO,
    "reinforce_pp": REINFORCEPP,
}

# Named recipes of the critic-free methods' fixes, for comparing them in one grid (``lm-gym benchmark --algos
# grpo,dr_grpo,dapo,gspo``): an algorithm of ALGORITHMS and the settings that make the recipe (docs/algorithms.md).
RECIPES: dict[str, tuple[str, dict[str, Any]]] = {
    "dr_grpo": ("grpo", dict(scale="none", aggregation="dr_grpo")),  # Liu et al. 2025, section 3.1
    # Yu et al. 2025 without the overlong filtering (mask_truncated=True): on short texts that hit the length
    # limit (the sentiment task's 24 tokens) it would leave little to learn from
    "dapo": ("grpo", dict(aggregation="dapo", eps_high=0.28, dynamic_sampling=True, kl_coef=0.0)),
    "gspo": (
        "grpo",
        dict(importance="sequence", eps_low=3e-4, eps_high=4e-4, kl_coef=0.0),
    ),  # Zheng et al. 2025
    "reinforce_pp_baseline": ("reinforce_pp", dict(baseline=True, group_size=4)),
}


def run_training(
    algo: str = "ppo",
    *,
    model: str = DEFAULT_MODEL,
    task: str = "sentiment",
    reward: str | None = None,
    iterations: int = 10,
    run_dir: str | Path = "runs/train",
    resume: bool = False,
    overwrite: bool = False,
    device: str | None = None,
    dtype: str | None = None,
    policy_settings: Mapping[str, Any] | None = None,
    algo_settings: Mapping[str, Any] | None = None,
    verbose: int = 1,
    log: Callable[[str], Any] = print,
) -> OnPolicyAlgorithm:
    """Train ``model`` with the algorithm named ``algo`` on ``task`` for ``iterations`` in ``run_dir``.

    Args:
        algo: a key of :data:`ALGORITHMS`.
        model: the policy's initial model: a name (``tiny``, ``tiny-t5``, ``smollm2-135m``), folder or Hub id.
        task: prompt set and gold reward.
        reward: reward model name/folder, or ``"vader"`` (default: the task's reward).
        iterations: rollout+update iterations in total (a resumed run trains up to this many).
        run_dir: logs, ``metrics.jsonl``, samples, checkpoints, the final model.
        resume: continue from the latest checkpoint in ``run_dir``, with the same settings.
        overwrite: delete the run already in ``run_dir`` first.
        device: a torch device name (default: this process's GPU if there is one, else cpu).
        dtype: ``bf16``, ``fp16`` or ``fp32`` (default fp32, or bf16 under ``accelerate launch
            --mixed_precision bf16``).
        policy_settings: keyword arguments of :class:`~algorithms.policy.LMActorCriticPolicy`.
        algo_settings: keyword arguments of the algorithm (its own and the shared core's).
        verbose: 0: no progress bar or metric tables.
        log: where the lines on resuming and on the finished run go (the main process's only).
    """
    algo_cls = ALGORITHMS[algo]
    policy_settings, algo_settings = dict(policy_settings or {}), dict(algo_settings or {})
    torch_device, torch_dtype = device_and_dtype(device, dtype)
    folder = Path(run_dir)
    settings = {  # what decides the run's course: resuming it with other values is refused
        "algo": algo,
        "model": model,
        "task": task,
        "reward": reward,
        "dtype": next(k for k, v in DTYPES.items() if v == torch_dtype),
        **algo_settings,
        **policy_settings,
    }
    if resume:
        _check_resumed_settings(folder, settings, algo_cls)
    policy = LMActorCriticPolicy.from_pretrained(
        model, seed=algo_settings.get("seed", 0), device=torch_device, dtype=torch_dtype, **policy_settings
    )
    runner = algo_cls(policy, task=task, reward=reward, run_dir=folder, verbose=verbose, **algo_settings)
    # once every setting is checked (the algorithm writes nothing before learn or load_checkpoint); the name
    # as given: an empty one is refused (Path("") would be ".")
    prepare_run_dir(run_dir, resume=resume, overwrite=overwrite, flag="--run-dir", markers=["final"])
    main = runner.is_main_process  # with several processes (accelerate launch), the one that writes
    if resume:
        runner.load_checkpoint(folder)
        if main:
            log(f"resumed from iteration {runner.iteration}")
    if main:
        record = {**settings, "device": str(torch_device), "processes": runner.world_size}
        (folder / "config.json").write_text(json.dumps(record, indent=2, default=str))
    runner.learn(iterations, progress_bar=verbose > 0)
    runner.close()
    if main:
        log(
            f"run directory: {folder} (tensorboard --logdir {folder / 'tensorboard'}); "
            f"model: {folder / 'final'}"
        )
    return runner


def _check_resumed_settings(run_dir: Path, settings: dict[str, Any], algo_cls: type) -> None:
    """Refuse to resume the run in ``run_dir`` with settings other than those in its ``config.json``; a
    setting that is not given counts as its default on either side. The device and the number of processes
    may change."""
    saved = run_dir / "config.json"
    if not saved.is_file():
        return  # no run there: load_checkpoint says so
    stored = {k: v for k, v in json.loads(saved.read_text()).items() if k not in ("device", "processes")}
    classes = (LMActorCriticPolicy, OnPolicyAlgorithm, algo_cls)
    defaults = {q.name: q.default for cls in classes for q in parameters(cls) if q.default is not q.empty}
    defaults = {k: defaults.get(k) for k in {*stored, *settings}}
    hint = "resume with the same settings, or start afresh with --overwrite"
    check_same_settings({**defaults, **stored}, {**defaults, **settings}, str(run_dir), hint)
