"""The benchmark grid (``lm-gym benchmark``): a grid of (algorithm, seed) runs on one task, then tables and
plots. (The scripts in ``benchmarks/`` time the machinery; this compares the algorithms' results.)

Each cell trains from the same initial model with its algorithm's settings, then is evaluated on the
task's held-out prompts (:func:`lm_gym.evaluation.evaluate`). A cell writes ``result.json`` when it is
done, so running the same command again skips finished cells and resumes an interrupted one from its
last checkpoint. The summary is a mean and a 95% confidence interval (Student t) over seeds per metric,
written as ``results.md`` and ``results.csv``, with two figures: learning curves with confidence bands,
and gold score against KL.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from algorithms.common.distributed import is_main_process
from algorithms.common.on_policy import OnPolicyAlgorithm
from algorithms.policy import LMActorCriticPolicy
from algorithms.presets import GRID, GRID_QUICK

__all__ = ["BenchmarkSpec", "mean_ci", "preset_spec", "run_benchmark", "summarize"]

INITIAL = "initial"  # the untrained model's row (no training; KL 0)

METRICS = {
    "gold": "gold score",
    "score": "reward-model score",
    "kl": "KL to the initial model (nats/text)",
    "perplexity": "perplexity under the initial model",
    "distinct_1": "distinct-1",
    "distinct_2": "distinct-2",
    "wall_time_s": "wall time (s)",
}


@dataclass
class BenchmarkSpec:
    """What to run.

    Args:
        algorithms: name -> algorithm class, in table order.
        seeds: seeds of each algorithm (one cell per algorithm and seed).
        task: the task name.
        model: the initial model of every cell.
        iterations: rollout+update iterations per cell.
        eval_prompts: held-out prompts in each cell's final evaluation.
        settings: shared keyword arguments of the algorithm classes.
        algo_settings: name -> keyword arguments for that algorithm only (override ``settings``).
        policy_settings: keyword arguments of :class:`~algorithms.policy.LMActorCriticPolicy`.
        reward: reward-model name/folder for training and the "reward-model score" (default: the task's).
        device: where every model runs (default: this process's GPU if any, else CPU).
        dtype: the dtype of every model (default float32; bf16 halves the memory).
    """

    algorithms: Mapping[str, type[OnPolicyAlgorithm]]
    seeds: Sequence[int] = (0, 1, 2)
    task: str = "sentiment"
    model: str = "smollm2-135m"
    iterations: int = 10
    eval_prompts: int = 32
    settings: dict[str, Any] = field(default_factory=dict)
    algo_settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    policy_settings: dict[str, Any] = field(default_factory=dict)
    reward: str | None = None
    device: str | torch.device | None = None
    dtype: str | torch.dtype | None = None

    def cell_settings(self, algo: str, seed: int) -> dict[str, Any]:
        return {**self.settings, **self.algo_settings.get(algo, {}), "seed": seed}


def preset_spec(
    algorithms: Mapping[str, type[OnPolicyAlgorithm]],
    *,
    quick: bool = False,
    settings: Mapping[str, Any] | None = None,
    algo_settings: Mapping[str, Mapping[str, Any]] | None = None,
    **fields: Any,
) -> BenchmarkSpec:
    """``lm-gym benchmark``'s grid: a preset (:data:`~algorithms.presets.GRID`, or with ``quick``
    :data:`~algorithms.presets.GRID_QUICK`) with what is given on top.

    Args:
        algorithms: name -> algorithm class, in table order.
        quick: the quick preset (tiny model, toy task) instead of the one for the embedded model.
        settings: shared keyword arguments of the algorithms, on top of the preset's.
        algo_settings: name -> keyword arguments for that algorithm only, on top of the preset's for it.
        **fields: other fields of :class:`BenchmarkSpec` (``seeds``, ``model``, ``iterations``...); None: the
            preset's.
    """
    preset = GRID_QUICK if quick else GRID
    given = {k: v for k, v in fields.items() if v is not None}
    return BenchmarkSpec(
        algorithms=algorithms,
        **{**{k: v for k, v in preset.items() if k not in ("settings", "algo_settings")}, **given},
        settings={**preset["settings"], **(settings or {})},
        algo_settings={
            name: {**preset["algo_settings"].get(name, {}), **(algo_settings or {}).get(name, {})}
            for name in algorithms
        },
    )


def run_cell(spec: BenchmarkSpec, algo: str, seed: int, cell_dir: Path) -> dict[str, Any]:
    """Train and evaluate one cell (resuming it from its last checkpoint); write and return its result."""
    from lm_gym.evaluation import evaluate
    from lm_gym.models import load_causal_lm

    settings = spec.cell_settings(algo, seed)
    record = {
        "algo": algo,
        "seed": seed,
        "model": spec.model,
        "iterations": spec.iterations,
        "reward": spec.reward,
        **settings,
    }
    where = dict(seed=seed, device=spec.device, dtype=spec.dtype)
    model, tokenizer = load_causal_lm(spec.model, **where)
    reference = load_causal_lm(spec.model, **where)[0].requires_grad_(False)
    if algo == INITIAL:  # the untrained model: the row every algorithm is compared with
        history, policy_model, main = [], model, is_main_process()
        if main:
            cell_dir.mkdir(parents=True, exist_ok=True)
    else:
        policy = LMActorCriticPolicy(model, tokenizer, **spec.policy_settings)
        runner = spec.algorithms[algo](
            policy, task=spec.task, reward=spec.reward, run_dir=cell_dir, verbose=0, **settings
        )
        if (cell_dir / "checkpoints" / "latest").exists():
            runner.load_checkpoint(cell_dir)
        main = runner.is_main_process  # with several processes (accelerate launch), the one that writes
        if main:
            cell_dir.mkdir(parents=True, exist_ok=True)
            (cell_dir / "settings.json").write_text(json.dumps(record, indent=2, default=str))
        runner.learn(spec.iterations)
        runner.close()
        history = _history(cell_dir / "metrics.jsonl")
        policy_model = policy.model.merge_and_unload() if policy.adapter else policy.model
    result = evaluate(
        policy_model,
        tokenizer,
        reference=reference,
        task=spec.task,
        reward=spec.reward,
        num_prompts=spec.eval_prompts,
        max_new_tokens=settings.get("max_new_tokens", 48),
        seed=seed,
    )
    wall = sum(h.get("time/rollout_s", 0.0) + h.get("time/train_s", 0.0) for h in history)
    out = {
        **record,
        "metrics": {**result.metrics, "wall_time_s": wall},
        "curve": [
            {k: h[k] for k in ("iteration", "rollout/rm_score", "rollout/kl") if k in h} for h in history
        ],
    }
    if main:
        tmp = cell_dir / "result.json.tmp"
        tmp.write_text(json.dumps(out, indent=1, default=str))
        tmp.replace(cell_dir / "result.json")  # a cell is finished when, and only when, this file exists
    return out


def run_benchmark(
    spec: BenchmarkSpec, out_dir: str | Path, log=print, report_only: bool = False
) -> list[dict[str, Any]]:
    """Run every unfinished cell of the grid (with ``report_only``, none: the finished ones are reported),
    then write the tables and plots; return the cell results."""
    out_dir = Path(out_dir)
    results = []
    # seed-major: an interrupted grid has every algorithm on the first seeds; the initial model first
    cells = [(algo, seed) for seed in spec.seeds for algo in (INITIAL, *spec.algorithms)]
    for n, (algo, seed) in enumerate(cells, 1):
        cell_dir = out_dir / algo / f"seed_{seed}"
        done = cell_dir / "result.json"
        if done.exists():
            result = json.loads(done.read_text())
            _check_same_settings(result, spec, algo, seed, done)
            log(f"[{n}/{len(cells)}] {algo} seed {seed}: done earlier, skipped")
        elif report_only and algo != INITIAL:  # (the initial model's evaluation is quick: always there)
            log(f"[{n}/{len(cells)}] {algo} seed {seed}: not run, left out of the report")
            continue
        else:
            start = time.perf_counter()
            doing = "evaluating" if algo == INITIAL else f"training {spec.iterations} iterations"
            log(f"[{n}/{len(cells)}] {algo} seed {seed}: {doing}")
            result = run_cell(spec, algo, seed, cell_dir)
            log(
                f"[{n}/{len(cells)}] {algo} seed {seed}: gold {result['metrics']['gold']:+.3f} "
                f"KL {result['metrics']['kl']:.2f} ({time.perf_counter() - start:.0f} s)"
            )
        results.append(result)
    if not results:
        raise ValueError(f"no finished cell in {out_dir} to report")
    if is_main_process():
        summarize(results, out_dir, spec)
    return results


def _check_same_settings(
    result: dict[str, Any], spec: BenchmarkSpec, algo: str, seed: int, path: Path
) -> None:
    wanted = {
        "model": spec.model,
        "iterations": spec.iterations,
        "reward": spec.reward,
        **spec.cell_settings(algo, seed),
    }
    changed = {k: (result.get(k), v) for k, v in wanted.items() if result.get(k) != v}
    if changed:
        key, (old, new) = next(iter(changed.items()))
        raise ValueError(
            f"{path} was run with {key}={old!r}, now {new!r}: use another --out directory (or delete the cell)"
        )


def _history(path: Path) -> list[dict[str, float]]:
    """The metrics of each iteration; after a resume the re-run iterations replace the lost ones."""
    by_iteration: dict[int, dict[str, float]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            by_iteration[int(row["iteration"])] = row
    return [by_iteration[k] for k in sorted(by_iteration)]


# ---------------------------------------------------------------------------------------------- summary
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228]  # df = 1..10


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% Student-t confidence interval (nan with one value)."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if len(x) == 0:
        return float("nan"), float("nan")
    if len(x) == 1:
        return float(x[0]), float("nan")
    t = _T975[len(x) - 2] if len(x) - 1 <= len(_T975) else 1.96
    return float(x.mean()), float(t * x.std(ddof=1) / math.sqrt(len(x)))


def summarize(results: list[dict[str, Any]], out_dir: str | Path, spec: BenchmarkSpec | None = None) -> str:
    """Write ``results.md``, ``results.csv``, ``learning_curves.png`` and ``gold_vs_kl.png``; return the
    markdown table."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    algos = list(dict.fromkeys(r["algo"] for r in results))
    rows, table = [], []
    for algo in algos:
        cells = [r for r in results if r["algo"] == algo]
        row: dict[str, Any] = {"algo": algo, "seeds": len(cells)}
        cols = [algo, str(len(cells))]
        for key in METRICS:
            mean, ci = mean_ci([c["metrics"].get(key, float("nan")) for c in cells])
            row[key], row[key + "_ci95"] = mean, ci
            digits = 0 if key == "wall_time_s" else 3
            cols.append(f"{mean:.{digits}f}" + ("" if math.isnan(ci) else f" ± {ci:.{digits}f}"))
        rows.append(row)
        table.append("| " + " | ".join(cols) + " |")
    header = "| algorithm | seeds | " + " | ".join(METRICS.values()) + " |"
    rule = "|" + "---|" * (len(METRICS) + 2)
    lines = [header, rule, *table]
    if spec is not None:
        lines += [
            "",
            f"Task {spec.task}, model {spec.model}, {spec.iterations} iterations per run, "
            f"{spec.eval_prompts} held-out prompts; mean ± 95% CI over seeds.",
        ]
    markdown = "\n".join(lines)
    (out_dir / "results.md").write_text(markdown + "\n")
    with open(out_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    _plot(results, algos, out_dir)
    return markdown


def _plot(results: list[dict[str, Any]], algos: list[str], out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_score, ax_kl) = plt.subplots(1, 2, figsize=(10, 3.6))
    fig2, ax = plt.subplots(figsize=(5.5, 4))
    for i, algo in enumerate(algos):
        color = f"C{i}"
        cells = [r for r in results if r["algo"] == algo]
        length = min(len(c["curve"]) for c in cells)
        if length:
            steps = [c["curve"][j]["iteration"] for c in cells[:1] for j in range(length)]
            for axis, key in ((ax_score, "rollout/rm_score"), (ax_kl, "rollout/kl")):
                stats = [
                    mean_ci([c["curve"][j].get(key, float("nan")) for c in cells]) for j in range(length)
                ]
                mean = np.array([m for m, _ in stats])
                ci = np.nan_to_num(np.array([h for _, h in stats]))
                axis.plot(steps, mean, color=color, label=algo)
                axis.fill_between(steps, mean - ci, mean + ci, color=color, alpha=0.2)
            kl = [np.mean([c["curve"][j].get("rollout/kl", np.nan) for c in cells]) for j in range(length)]
            score = [
                np.mean([c["curve"][j].get("rollout/rm_score", np.nan) for c in cells]) for j in range(length)
            ]
            ax.plot(kl, score, color=color, alpha=0.5, label=f"{algo} (training rollouts: reward score)")
        ax.scatter(
            [c["metrics"]["kl"] for c in cells],
            [c["metrics"]["gold"] for c in cells],
            color=color,
            marker="o",
            edgecolor="black",
            label=f"{algo} (held-out evaluation, per seed)",
        )
    ax_score.set(xlabel="iteration", ylabel="reward-model score", title="rollout reward (mean, 95% CI)")
    ax_kl.set(xlabel="iteration", ylabel="KL (nats/text)", title="KL to the initial model (mean, 95% CI)")
    ax_score.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "learning_curves.png", dpi=100)
    ax.set(xlabel="KL to the initial model (nats/text)", ylabel="gold score", title="gold score against KL")
    ax.legend(fontsize=7)
    fig2.tight_layout()
    fig2.savefig(out_dir / "gold_vs_kl.png", dpi=100)
    plt.close(fig)
    plt.close(fig2)
