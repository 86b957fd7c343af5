"""The RLHF demo (``lm-gym demo``): PPO on the sentiment task, a before/after table and a learning curve."""

from __future__ import annotations

import argparse
from pathlib import Path

from algorithms.flags import device_and_dtype
from algorithms.policy import LMActorCriticPolicy
from algorithms.ppo import PPO

DEMO = dict(n_envs=16, max_new_tokens=24, learning_rate=6e-5, n_epochs=2, batch_size=8, kl_coef=0.05, seed=0)


def demo(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """RLHF demo: PPO on the sentiment task, then a before/after table on held-out prompts and a curve."""
    from lm_gym.evaluation import evaluate

    run_dir = Path(args.run_dir)
    device, dtype = device_and_dtype(args.device, args.dtype)
    policy = LMActorCriticPolicy.from_pretrained(args.model, seed=0, device=device, dtype=dtype)
    reference = policy.reference_copy()
    settings = {**DEMO, "max_new_tokens": args.max_new_tokens, "learning_rate": args.learning_rate}
    if args.model == "tiny":  # smoke run: a random 0.3M model has no sentiment to improve
        settings.update(n_envs=4, learning_rate=1e-3)
    common = dict(
        task="sentiment", split="eval", num_prompts=args.eval_prompts, max_new_tokens=args.max_new_tokens
    )
    print(f"[1/3] evaluating the initial model on {args.eval_prompts} held-out prompts")
    before = evaluate(policy.model, policy.tokenizer, reference=reference, **common)
    print(f"[2/3] PPO for {args.iterations} iterations ({settings['n_envs']} texts each); logs in {run_dir}")
    algo = PPO(policy, task="sentiment", run_dir=run_dir, verbose=0, **settings)
    algo.learn(args.iterations, progress_bar=True)
    algo.close()
    print("[3/3] evaluating the fine-tuned model")
    after = evaluate(policy.model, policy.tokenizer, reference=reference, **common)
    if algo.is_main_process:
        print(_demo_report(before, after, algo.logger.history, run_dir))
    return {"before": before.metrics, "after": after.metrics}


def _demo_report(before, after, history: list[dict[str, float]], run_dir: Path) -> str:
    names = {
        "gold": "gold sentiment (VADER, mean)",
        "gold_positive": "share of positive texts",
        "kl": "KL to the initial model (nats/text)",
        "perplexity": "perplexity under the initial model",
        "distinct_2": "distinct-2",
        "length": "tokens per text",
    }
    lines = ["| metric | before | after |", "|---|---|---|"]
    lines += [
        f"| {label} | {_cell(before.metrics[k])} | {_cell(after.metrics[k])} |" for k, label in names.items()
    ]
    lines += ["", "| prompt | before | after |", "|---|---|---|"]
    for b, a in list(zip(before.samples, after.samples))[:4]:
        lines.append(f"| {b[0]} | {b[1]!r} ({b[3]:+.2f}) | {a[1]!r} ({a[3]:+.2f}) |")
    report = "\n".join(lines)
    (run_dir / "demo_report.md").write_text(report + "\n")
    _plot_curve(history, run_dir / "learning_curve.png")
    return report + f"\n\nlearning curve: {run_dir / 'learning_curve.png'}"


def _cell(value: float) -> str:
    """A metric to 3 decimals; + 0.0 writes a KL of -1e-7 (rounding of two equal log-probs) as 0.000."""
    return f"{round(value, 3) + 0.0:.3f}"


def _plot_curve(history: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["iteration"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
    ax1.plot(steps, [h["rollout/rm_score"] for h in history])
    ax1.set(xlabel="iteration", ylabel="reward-model score", title="reward of the rollouts")
    ax2.plot(steps, [h["rollout/kl"] for h in history], color="tab:red")
    ax2.set(xlabel="iteration", ylabel="KL (nats/text)", title="KL to the initial model")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
