"""The ``lm-gym`` command. Thin: parses arguments, then calls library code.

Every hyperparameter flag is generated from the signature and the ``Args:`` docstring of the class that
takes it (the policy, the shared core, the algorithm), so ``--help`` and the library never disagree.
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

from algorithms.common.on_policy import OnPolicyAlgorithm
from algorithms.policy import LMActorCriticPolicy
from algorithms.ppo import PPO
from lm_gym.env import DEFAULT_MODEL
from lm_gym.tasks import TASKS

ALGORITHMS = {"ppo": PPO}
SKIP = {
    "self",
    "policy",
    "model",
    "tokenizer",
    "task",
    "reward",
    "prompts",
    "kwargs",
    "run_dir",
    "verbose",
    "stop_token_ids",
}


# ---------------------------------------------------------------------------------------------- flags
def _docstring_args(obj: Any) -> dict[str, str]:
    """``name -> help`` from a Google-style ``Args:`` section."""
    doc = inspect.getdoc(obj) or ""
    match = re.search(r"^Args:\n(.*?)(?:^\S|\Z)", doc, re.S | re.M)
    helps: dict[str, str] = {}
    name = None
    for line in (match.group(1) if match else "").splitlines():
        item = re.match(r"^    (\*{0,2}\w+)(?: \(.*?\))?: (.*)", line)
        if item:
            name = item.group(1).lstrip("*")
            helps[name] = item.group(2)
        elif name and line.startswith("        "):
            helps[name] += " " + line.strip()
    return helps


def _flag_type(annotation: str, default: Any):
    if isinstance(default, bool) or annotation == "bool":
        return None
    for name, kind in (("int", int), ("float", float), ("str", str)):
        if default is not None and type(default) is kind:
            return kind
        if annotation.split(" | ")[0] == name:
            return kind
    return str


def add_class_flags(parser: argparse.ArgumentParser, cls: type, title: str) -> list[str]:
    """Add one ``--flag`` per keyword argument of ``cls.__init__``; return the parameter names."""
    group = parser.add_argument_group(title)
    helps = _docstring_args(cls)
    names = []
    for p in inspect.signature(cls.__init__).parameters.values():
        if p.name in SKIP or p.default is inspect.Parameter.empty or p.kind is p.VAR_KEYWORD:
            continue
        annotation = p.annotation if isinstance(p.annotation, str) else getattr(p.annotation, "__name__", "")
        kind = _flag_type(annotation, p.default)
        text = f"{helps.get(p.name, '')} (default: {p.default})".replace("%", "%%")  # argparse formats help
        flag = "--" + p.name.replace("_", "-")
        if kind is None:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            group.add_argument(flag, type=kind, default=None, help=text, metavar=kind.__name__.upper())
        names.append(p.name)
    return names


def _settings(args: argparse.Namespace, names: list[str], config: dict[str, Any]) -> dict[str, Any]:
    """Flags given on the command line win over the config file, which wins over the defaults."""
    out = {k: v for k, v in config.items() if k in names}
    out.update({k: getattr(args, k) for k in names if getattr(args, k) is not None})
    return out


def _load_config(path: str | None) -> dict[str, Any]:
    if path is None:
        return {}
    import yaml  # a dependency of transformers

    text = Path(path).read_text()
    data = yaml.safe_load(text) if text.strip() else {}
    if not isinstance(data, dict):
        raise ValueError(f"config {path}: expected a mapping of hyperparameter names to values")
    return {k.replace("-", "_"): v for k, v in data.items()}


# ---------------------------------------------------------------------------------------------- commands
def build_policy(model_name: str, settings: dict[str, Any], seed: int) -> LMActorCriticPolicy:
    from lm_gym.models import load_causal_lm

    model, tokenizer = load_causal_lm(model_name, seed=seed)
    return LMActorCriticPolicy(model, tokenizer, **settings)


def train(args: argparse.Namespace) -> OnPolicyAlgorithm:
    config = _load_config(args.config)
    algo_cls = ALGORITHMS[args.algo]
    unknown = set(config) - set(args.policy_names) - set(args.algo_names) - {"model", "task", "iterations"}
    if unknown:
        raise ValueError(f"config {args.config}: unknown keys {sorted(unknown)}; see lm-gym train --help")
    algo_settings = _settings(args, args.algo_names, config)
    policy_settings = _settings(args, args.policy_names, config)
    model_name = args.model or config.get("model", DEFAULT_MODEL)
    task = args.task or config.get("task", "sentiment")
    policy = build_policy(model_name, policy_settings, algo_settings.get("seed", 0))
    run_dir = Path(args.run_dir)
    algo = algo_cls(
        policy,
        task=task,
        reward=args.reward,
        run_dir=run_dir,
        verbose=0 if args.quiet else 1,
        **algo_settings,
    )
    if args.resume:
        algo.load_checkpoint(run_dir)
        print(f"resumed from iteration {algo.iteration}")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(
        json.dumps(
            {
                "algo": args.algo,
                "model": model_name,
                "task": task,
                **algo_settings,
                **policy_settings,
            },
            indent=2,
            default=str,
        )
    )
    algo.learn(args.iterations or config.get("iterations", 10), progress_bar=not args.quiet)
    algo.close()
    print(
        f"run directory: {run_dir} (tensorboard --logdir {run_dir / 'tensorboard'}); model: {run_dir / 'final'}"
    )
    return algo


def evaluate_cmd(args: argparse.Namespace) -> dict[str, float]:
    from lm_gym.evaluation import evaluate
    from lm_gym.models import load_causal_lm

    policy, tokenizer = load_causal_lm(args.policy)
    reference = load_causal_lm(args.reference)[0] if args.reference else policy
    result = evaluate(
        policy,
        tokenizer,
        reference=reference,
        task=args.task,
        split=args.split,
        reward=args.reward,
        num_prompts=args.num_prompts,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        seed=args.seed,
    )
    for prompt, text, score, gold, kl in result.samples[: args.show]:
        print(f"score {score:+.3f} gold {gold:+.3f} KL {kl:6.2f} | {prompt} >>> {text!r}")
    print(json.dumps({k: round(v, 4) for k, v in result.metrics.items()}))
    return result.metrics


DEMO = dict(n_envs=16, max_new_tokens=24, learning_rate=6e-5, n_epochs=2, batch_size=8, kl_coef=0.05, seed=0)


def demo(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """RLHF demo: PPO on the sentiment task, then a before/after table on held-out prompts and a curve."""
    from lm_gym.evaluation import evaluate

    run_dir = Path(args.run_dir)
    policy = build_policy(args.model, {}, seed=0)
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
    report = _demo_report(before, after, algo.logger.history, run_dir)
    print(report)
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
    lines += [f"| {label} | {before.metrics[k]:.3f} | {after.metrics[k]:.3f} |" for k, label in names.items()]
    lines += ["", "| prompt | before | after |", "|---|---|---|"]
    for b, a in list(zip(before.samples, after.samples))[:4]:
        lines.append(f"| {b[0]} | {b[1]!r} ({b[3]:+.2f}) | {a[1]!r} ({a[3]:+.2f}) |")
    report = "\n".join(lines)
    (run_dir / "demo_report.md").write_text(report + "\n")
    _plot_curve(history, run_dir / "learning_curve.png")
    return report + f"\n\nlearning curve: {run_dir / 'learning_curve.png'}"


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lm-gym", description="RL fine-tuning of language models on TextGen-v0"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="RL fine-tuning of a model on a task")
    p.add_argument("--algo", default="ppo", choices=sorted(ALGORITHMS), help="the RL algorithm")
    p.add_argument(
        "--model",
        default=None,
        help=f"policy's initial model: tiny, smollm2-135m, a folder or Hub id (default {DEFAULT_MODEL})",
    )
    p.add_argument(
        "--task", default=None, choices=sorted(TASKS), help="prompt set and gold reward (default sentiment)"
    )
    p.add_argument(
        "--reward", default=None, help="reward model name/folder, or 'vader'; default the task's reward"
    )
    p.add_argument(
        "--iterations", type=int, default=None, help="rollout+update iterations in total (default 10)"
    )
    p.add_argument(
        "--run-dir", default="runs/train", help="logs, metrics.jsonl, samples, checkpoints, final model"
    )
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --run-dir")
    p.add_argument("--config", default=None, help="YAML/JSON file of hyperparameters (flags override it)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or metric tables")
    p.set_defaults(func=train)
    p.set_defaults(policy_names=add_class_flags(p, LMActorCriticPolicy, "policy"))
    names = add_class_flags(p, OnPolicyAlgorithm, "shared on-policy settings")
    names += add_class_flags(p, PPO, "PPO")
    p.set_defaults(algo_names=names)

    p = sub.add_parser("demo", help="the RLHF demo: PPO on sentiment, before/after table and learning curve")
    p.add_argument("--model", default=DEFAULT_MODEL, help="initial model (tiny for a smoke run)")
    p.add_argument(
        "--iterations", type=int, default=20, help="PPO iterations (about 25 s each on 2 CPU cores)"
    )
    p.add_argument("--max-new-tokens", type=int, default=24, help="text length")
    p.add_argument("--eval-prompts", type=int, default=32, help="held-out prompts for the before/after table")
    p.add_argument("--learning-rate", type=float, default=DEMO["learning_rate"], help="AdamW learning rate")
    p.add_argument("--run-dir", default="runs/demo", help="logs, report, curve, final model")
    p.set_defaults(func=demo)

    p = sub.add_parser("eval", help="score a saved model on a task's eval prompts")
    p.add_argument(
        "--policy", default=DEFAULT_MODEL, help="model to evaluate: a folder (e.g. RUN/final) or a name"
    )
    p.add_argument(
        "--reference",
        default=None,
        help="the initial model for KL and perplexity (default: the policy itself)",
    )
    p.add_argument("--task", default="sentiment", choices=sorted(TASKS), help="prompt set and gold scorer")
    p.add_argument("--split", default="eval", choices=["train", "eval"], help="which prompts")
    p.add_argument(
        "--reward", default=None, help="reward model name/folder (default: the task's gold scorer)"
    )
    p.add_argument("--num-prompts", type=int, default=None, help="evaluate on the first N prompts only")
    p.add_argument("--max-new-tokens", type=int, default=48, help="text length limit")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--seed", type=int, default=0, help="seeds the sampling")
    p.add_argument("--show", type=int, default=5, help="print this many sample texts")
    p.set_defaults(func=evaluate_cmd)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as err:
        sys.exit(f"lm-gym {args.command}: error: {err}")
    print(f"done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
