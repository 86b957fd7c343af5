"""The RLHF demo (``lm-gym demo``): PPO on the sentiment task for several seeds, a before/after table of the
mean and spread over the seeds, and the learning curves.

One seed is one draw, and on another CPU the same seed is another draw (float rounding differs between
kernels): the table reports the mean and the standard deviation over the seeds, and names the machine.
"""

from __future__ import annotations

import platform
import re
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from algorithms.flags import device_and_dtype
from algorithms.policy import LMActorCriticPolicy
from algorithms.ppo import PPO
from algorithms.presets import DEMO, DEMO_EVAL_PROMPTS, DEMO_ITERATIONS, DEMO_SEEDS, DEMO_TINY
from lm_gym.env import DEFAULT_MODEL

__all__ = ["METRICS", "cpu_name", "demo"]

METRICS = {
    "gold": "gold sentiment (VADER compound, mean)",
    "gold_positive": "share of positive texts (compound > 0.05)",
    "kl": "KL to the initial model (nats per text)",
    "perplexity": "perplexity under the initial model",
    "distinct_2": "distinct-2",
    "length": "tokens per text",
}


def demo(
    *,
    model: str = DEFAULT_MODEL,
    task: str = "sentiment",
    seeds: Sequence[int] = DEMO_SEEDS,
    iterations: int = DEMO_ITERATIONS,
    max_new_tokens: int = DEMO["max_new_tokens"],
    eval_prompts: int | None = DEMO_EVAL_PROMPTS,
    learning_rate: float = DEMO["learning_rate"],
    run_dir: str | Path = "runs/demo",
    device: str | None = None,
    dtype: str | None = None,
) -> dict[int, dict[str, dict[str, float]]]:
    """RLHF demo: for each seed, PPO (:data:`~algorithms.presets.DEMO`) on the task between a before and an
    after evaluation on held-out prompts; then the table of mean and spread over the seeds and the learning
    curves, written to ``run_dir``. Returns ``seed -> {"before": metrics, "after": metrics}``.

    Args:
        model: the initial model (``tiny`` for a smoke run, with ``task="letters"``: it takes
            :data:`~algorithms.presets.DEMO_TINY`'s settings).
        task: prompt set and gold reward.
        seeds: one PPO run per seed.
        iterations: PPO iterations per seed (about 15 s each on 2 CPU cores).
        max_new_tokens: text length, in training and evaluation.
        eval_prompts: held-out prompts of the before/after table (None: the whole eval split).
        learning_rate: AdamW learning rate.
        run_dir: the report and the curves; per seed, its logs and final model.
        device: a torch device name (default: this process's GPU if there is one, else cpu).
        dtype: ``bf16``, ``fp16`` or ``fp32`` (default fp32, or bf16 under ``accelerate launch
            --mixed_precision bf16``).
    """
    from lm_gym.evaluation import evaluate

    run_dir = Path(run_dir)
    torch_device, torch_dtype = device_and_dtype(device, dtype)
    settings = {**DEMO, "max_new_tokens": max_new_tokens, "learning_rate": learning_rate}
    if model == "tiny":  # smoke run: a random 0.3M model has no sentiment to improve
        settings.update(DEMO_TINY)
    common = dict(task=task, split="eval", num_prompts=eval_prompts, max_new_tokens=max_new_tokens)
    results, histories, start = {}, {}, time.perf_counter()
    for i, seed in enumerate(seeds):
        tag = f"seed {seed} ({i + 1}/{len(seeds)})"
        policy = LMActorCriticPolicy.from_pretrained(model, seed=seed, device=torch_device, dtype=torch_dtype)
        reference = policy.reference_copy()
        print(f"[{tag}] evaluating the initial model on {eval_prompts} held-out prompts")
        before = evaluate(policy.model, policy.tokenizer, reference=reference, seed=seed, **common)
        seed_dir = run_dir / f"seed{seed}"
        print(
            f"[{tag}] PPO for {iterations} iterations ({settings['n_envs']} texts each); logs in {seed_dir}"
        )
        algo = PPO(policy, task=task, run_dir=seed_dir, verbose=0, seed=seed, **settings)
        algo.learn(iterations, progress_bar=True)
        algo.close()
        print(f"[{tag}] evaluating the fine-tuned model")
        after = evaluate(policy.model, policy.tokenizer, reference=reference, seed=seed, **common)
        b, a = before.metrics, after.metrics
        print(
            f"[{tag}] gold {b['gold']:.3f} -> {a['gold']:.3f}, KL {a['kl']:.2f} nats per text, "
            f"perplexity {b['perplexity']:.1f} -> {a['perplexity']:.1f}"
        )
        results[seed], histories[seed] = (before, after), algo.logger.history
    elapsed = time.perf_counter() - start
    if algo.is_main_process:  # with several processes (accelerate launch), the one that writes
        command = f"lm-gym demo --model {model}" + ("" if task == "sentiment" else f" --task {task}")
        command += f" --iterations {iterations}"
        print(_demo_report(command, task, eval_prompts, results, histories, elapsed, run_dir))
    return {seed: {"before": b.metrics, "after": a.metrics} for seed, (b, a) in results.items()}


def cpu_name() -> str:
    """The CPU's model name and its widest vector extension (AVX-512 / AVX2), from /proc/cpuinfo on Linux."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    model = re.search(r"^model name\s*:\s*(.+)$", info, re.M)
    flags = re.search(r"^flags\s*:\s*(.+)$", info, re.M)
    flags = set(flags.group(1).split()) if flags else set()
    isa = "AVX-512" + (" with bf16" if "avx512_bf16" in flags else "") if "avx512f" in flags else None
    isa = isa or ("AVX2" if "avx2" in flags else platform.machine())
    cores = info.count("processor\t:") or "?"
    return f"{model.group(1).strip() if model else platform.machine()}, {isa}, {cores} cores"


def _mean_sd(values: list[float]) -> str:
    """``mean ± sd`` to 3 decimals (sd with n-1; a single seed shows its value alone); + 0.0 writes a KL of
    -1e-7 (rounding of two equal log-probs) as 0.000."""
    mean = round(float(np.mean(values)), 3) + 0.0
    if len(values) < 2:
        return f"{mean:.3f}"
    return f"{mean:.3f} ± {float(np.std(values, ddof=1)):.3f}"


def _demo_report(
    command: str,
    task: str,
    eval_prompts: int | None,
    results: dict,
    histories: dict,
    elapsed: float,
    run_dir: Path,
) -> str:
    """The before/after table of ``results`` (written to ``run_dir``); ``command`` is how it was run, without
    its ``--seeds``."""
    import torch
    import transformers

    seeds = list(results)

    def column(side: int, key: str) -> list[float]:  # side 0: before, 1: after
        return [results[s][side].metrics[key] for s in seeds]

    labels = METRICS if task == "sentiment" else {**METRICS, "gold": f"gold ({task} task's scorer, mean)"}
    lines = [
        f"`{command} --seeds {' '.join(map(str, seeds))}`: "
        f"mean ± standard deviation over {len(seeds)} seed(s), {eval_prompts} held-out prompts each; "
        f"{elapsed:.0f} s on {cpu_name()} (torch {torch.__version__}, transformers {transformers.__version__}).",
        "",
        "| metric | before | after |",
        "|---|---|---|",
    ]
    lines += [
        f"| {label} | {_mean_sd(column(0, k))} | {_mean_sd(column(1, k))} |" for k, label in labels.items()
    ]
    lift = [a - b for a, b in zip(column(1, "gold"), column(0, "gold"))]
    ratio = [a / b for a, b in zip(column(1, "perplexity"), column(0, "perplexity"))]
    kls = column(1, "kl")
    lines += [
        "",
        f"Gold lift {_mean_sd(lift)}, KL {_mean_sd(kls)} nats per text, perplexity after / before "
        f"{_mean_sd(ratio)}; per seed: "
        + "; ".join(f"{s}: {d:+.3f} at KL {k:.2f}, x{r:.2f}" for s, d, k, r in zip(seeds, lift, kls, ratio)),
        "",
        f"| prompt | before (seed {seeds[0]}) | after |",
        "|---|---|---|",
    ]
    before, fine_tuned = results[seeds[0]]
    for b, a in list(zip(before.samples, fine_tuned.samples))[:4]:
        lines.append(f"| {b[0]} | {b[1]!r} ({b[3]:+.2f}) | {a[1]!r} ({a[3]:+.2f}) |")
    report = "\n".join(lines)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "demo_report.md").write_text(report + "\n")
    _plot_curves(histories, run_dir / "learning_curve.png")
    return report + f"\n\nlearning curves: {run_dir / 'learning_curve.png'}"


def _plot_curves(histories: dict[int, list[dict[str, float]]], path: Path) -> None:
    """Reward and KL against the iteration: the mean over the seeds and the band between min and max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    panels = (
        ("rollout/rm_score", "reward-model score", "reward of the rollouts", "tab:blue"),
        ("rollout/kl", "KL (nats/text)", "KL to the initial model", "tab:red"),
    )
    for ax, (key, ylabel, title, color) in zip(axes, panels):
        steps = [h["iteration"] for h in next(iter(histories.values()))]
        values = np.array(
            [[h[key] for h in history] for history in histories.values()]
        )  # (seeds, iterations)
        ax.plot(steps, values.mean(0), color=color, label=f"mean of {len(values)} seed(s)")
        ax.fill_between(steps, values.min(0), values.max(0), color=color, alpha=0.2, label="min-max")
        ax.set(xlabel="iteration", ylabel=ylabel, title=title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
