"""The ``lm-gym`` command. Thin: parses arguments, then calls library code.

Each command's work lives in the library module it belongs to (:func:`algorithms.run.run_training`,
:func:`algorithms.demo.demo`, :func:`lm_gym.evaluation.evaluate`, :func:`algorithms.grid.run_benchmark`,
:class:`algorithms.sft.SFT`, :func:`lm_gym.preferences.collect_preferences`,
:func:`algorithms.reward_model.train_reward_model`, :func:`algorithms.pipeline.run_pipeline`); here are its
flags, and a function that turns them into that call. Every settings flag is generated from the signature and
the ``Args:`` docstring of what takes it (:func:`algorithms.flags.add_flags`), so ``--help`` and the library
never disagree; presets live in :mod:`algorithms.presets`. A mistake a user can make ends the command with
one line, ``lm-gym CMD: error: ...``; ``--debug`` raises it with its traceback instead.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from algorithms.common.checkpoints import prepare_run_dir
from algorithms.common.on_policy import NonFiniteLossError, OnPolicyAlgorithm
from algorithms.demo import demo
from algorithms.flags import (
    add_device_flags,
    add_flags,
    device_and_dtype,
    flag_actions,
    given_settings,
    load_config,
    non_negative_int,
    parameters,
    positive_float,
    positive_int,
    typed_settings,
)
from algorithms.pipeline import PipelineConfig
from algorithms.policy import LMActorCriticPolicy
from algorithms.presets import DEMO_SEEDS, GRID, GRID_QUICK, PIPELINE_PRESETS
from algorithms.reward_model import train_reward_model
from algorithms.run import ALGORITHMS, RECIPES, run_training
from algorithms.sft import SENTIMENT_DEMOS, SFT
from lm_gym.env import DEFAULT_MODEL
from lm_gym.evaluation import evaluate
from lm_gym.preferences import AnnotatorPanel, collect_preferences
from lm_gym.preferences.panel import AGGREGATES
from lm_gym.tasks import TASKS

# What a user's settings, files or machine can cause: each ends the command with one line, unless --debug.
USER_ERRORS = (ValueError, TypeError, OSError, ModuleNotFoundError, NonFiniteLossError)
DEBUG_HELP = "on an error, raise it with its traceback instead of printing one line"
OVERWRITE_HELP = "delete the run already in {} (checkpoints, logs, model) and start afresh"
# The settings of train_reward_model that train-rm takes as flags, and the RL settings that pipeline does.
RM_FLAGS = (
    "epochs",
    "learning_rate",
    "batch_size",
    "margin",
    "center_coef",
    "eval_fraction",
    "min_agreement",
    "max_length",
    "vote_share",
)
PIPELINE_RL_FLAGS = ("n_envs", "max_new_tokens", "kl_coef", "learning_rate")
# The parameters of the library call behind eval, demo and collect that those commands take as flags.
EVAL_FLAGS = ("num_prompts", "max_new_tokens", "temperature", "seed")  # lm_gym.evaluation.evaluate
DEMO_FLAGS = ("iterations", "max_new_tokens", "eval_prompts", "learning_rate")  # algorithms.demo.demo
COLLECT_FLAGS = ("k", "max_new_tokens", "temperature", "batch_size")  # collect_preferences
# The range check of every count, size, rate and seed flag of those commands (and train-rm's).
RANGES = dict(
    num_prompts=positive_int,
    max_new_tokens=positive_int,
    temperature=positive_float,
    seed=non_negative_int,
    iterations=positive_int,
    eval_prompts=positive_int,
    learning_rate=positive_float,
    k=positive_int,
    batch_size=positive_int,
    epochs=positive_int,
    max_length=positive_int,
)


# ---------------------------------------------------------------------------------------------- commands
def train_cmd(args: argparse.Namespace) -> OnPolicyAlgorithm:
    """RL fine-tuning: the flags, over the ``--config`` file's settings, checked against the algorithm's."""
    config = load_config(args.config, args.flags)
    algo = args.algo or config.get("algo", "ppo")
    if algo not in ALGORITHMS:
        raise ValueError(f"config {args.config}: algo {algo!r} is not one of {sorted(ALGORITHMS)}")
    algo_names = args.core_names + args.algo_names[algo]
    other = sorted({n for names in args.algo_names.values() for n in names} - set(algo_names))
    given = [n for n in other if getattr(args, n) is not None or n in config]
    if given:
        flags = ", ".join("--" + n.replace("_", "-") for n in given)
        raise ValueError(
            f"{flags} not an argument of {algo}; its own are: "
            + ", ".join("--" + n.replace("_", "-") for n in args.algo_names[algo])
        )
    unknown = set(config) - set(args.policy_names) - set(algo_names)
    unknown -= {"model", "task", "iterations", "algo", "dtype", "device"}
    if unknown:
        raise ValueError(f"config {args.config}: unknown keys {sorted(unknown)}; see lm-gym train --help")
    return run_training(
        algo,
        model=args.model or config.get("model", DEFAULT_MODEL),
        task=args.task or config.get("task", "sentiment"),
        reward=args.reward,
        iterations=args.iterations or config.get("iterations", 10),
        run_dir=args.run_dir,
        resume=args.resume,
        overwrite=args.overwrite,
        device=args.device or config.get("device"),
        dtype=args.dtype or config.get("dtype"),
        policy_settings=given_settings(args, args.policy_names, config),
        algo_settings=given_settings(args, algo_names, config),
        verbose=0 if args.quiet else 1,
    )


def demo_cmd(args: argparse.Namespace) -> dict[int, dict[str, dict[str, float]]]:
    options = ("model", "task", "seeds", *DEMO_FLAGS, "run_dir", "device", "dtype")
    return demo(**{name: getattr(args, name) for name in options})


def evaluate_cmd(args: argparse.Namespace) -> dict[str, float]:
    from lm_gym.models import load_causal_lm

    device, dtype = device_and_dtype(args.device, args.dtype)
    policy, tokenizer = load_causal_lm(args.policy, device=device, dtype=dtype)
    reference = load_causal_lm(args.reference, device=device, dtype=dtype)[0] if args.reference else policy
    result = evaluate(
        policy,
        tokenizer,
        reference=reference,
        task=args.task,
        split=args.split,
        reward=args.reward,
        **{name: getattr(args, name) for name in EVAL_FLAGS},
    )
    for prompt, text, score, gold, kl in result.samples[: args.show]:
        print(f"score {score:+.3f} gold {gold:+.3f} KL {kl:6.2f} | {prompt} >>> {text!r}")
    print(json.dumps({k: round(v, 4) for k, v in result.metrics.items()}))
    return result.metrics


def benchmark_cmd(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The grid: a preset, the ``--config`` file's shared settings and per-algorithm sections on top."""
    from algorithms.common.distributed import is_main_process
    from algorithms.grid import preset_spec, run_benchmark

    names = [a.strip() for a in args.algos.split(",") if a.strip()]
    known = {**{name: (name, {}) for name in ALGORITHMS}, **RECIPES}  # name -> (algorithm, recipe settings)
    unknown = [a for a in names if a not in known]
    if unknown or not names:
        raise ValueError(f"--algos: unknown {unknown or names}; choose among {', '.join(known)}")
    device, dtype = device_and_dtype(args.device, args.dtype)
    config = load_config(args.config, args.flags)
    settings = {k: v for k, v in config.items() if k not in known}
    algo_settings = {}
    for name in names:
        algo, recipe = known[name]
        section = config.get(name, {})
        if not isinstance(section, dict):
            raise ValueError(
                f"config {args.config}: {name}: expected a mapping of its settings; got {section!r}"
            )
        own = typed_settings(section, args.flags, f"config {args.config}: {name}")
        accepted = {p.name for p in parameters(OnPolicyAlgorithm) + parameters(ALGORITHMS[algo])}
        for key in {**settings, **own}:
            if key not in accepted:
                raise ValueError(f"config {args.config}: {key!r} is not an argument of {algo}")
        algo_settings[name] = {**recipe, **own}
    spec = preset_spec(
        {name: ALGORITHMS[known[name][0]] for name in names},
        quick=args.quick,
        settings=settings,
        algo_settings=algo_settings,
        seeds=list(range(args.seeds)),
        task=args.task,
        model=args.model,
        iterations=args.iterations,
        eval_prompts=args.eval_prompts,
        reward=args.reward,
        device=device,
        dtype=dtype,
    )
    results = run_benchmark(spec, args.out, report_only=args.report_only)
    if is_main_process():
        print((Path(args.out) / "results.md").read_text())
        print(f"tables and plots in {args.out}: results.md, results.csv, learning_curves.png, gold_vs_kl.png")
    return results


def sft_cmd(args: argparse.Namespace) -> dict[str, float]:
    """Supervised fine-tuning on demonstrations (RLHF step 1); the result is a model folder for ``train``."""
    from algorithms.sft import load_demonstrations
    from lm_gym.models import load_causal_lm

    settings = given_settings(args, args.sft_names, {})
    fields = dict(
        text_field=args.text_field, prompt_field=args.prompt_field, completion_field=args.completion_field
    )
    data = load_demonstrations(args.data, **fields)
    eval_data = load_demonstrations(args.eval_data, **fields) if args.eval_data else None
    model, tokenizer = load_causal_lm(args.model, seed=settings.get("seed", 0))
    options = dict(resume=args.resume, overwrite=args.overwrite, flag="--output-dir")
    checkpoints = prepare_run_dir(args.output_dir, **options, markers=["config.json"]) / "checkpoints"
    trainer = SFT(model, tokenizer, verbose=0 if args.quiet else 1, checkpoint_dir=checkpoints, **settings)
    result = trainer.learn(data, eval_data, resume=args.resume)
    out = trainer.save_pretrained(args.output_dir)  # by the main process, with several (accelerate launch)
    if trainer.process_group.is_main_process:
        print(json.dumps({k: round(v, 4) for k, v in result.metrics.items()}))
        print(f"model: {out} (RL from it: lm-gym train --model {out})")
    return result.metrics


def collect_cmd(args: argparse.Namespace) -> dict[str, float]:
    """Preference data (RLHF step 2): K completions per prompt, ranked by a simulated annotator panel."""
    from lm_gym.models import load_causal_lm
    from lm_gym.preferences import write_collection
    from lm_gym.preferences.collect import collection_report
    from lm_gym.tasks import get_task

    task = get_task(args.task)
    prompts = list(task.prompts(args.split))[: args.num_prompts]
    model, tokenizer = load_causal_lm(args.model, seed=args.seed)
    panel = AnnotatorPanel(
        task.make_reward(), aggregate=args.aggregate, min_agreement=args.min_agreement, seed=args.seed
    )
    sampling = {name: getattr(args, name) for name in COLLECT_FLAGS}
    collection = collect_preferences(
        model, tokenizer, prompts, panel, seed=args.seed, progress=True, **sampling
    )
    settings = {k: v for k, v in vars(args).items() if k not in ("func", "command", "debug")}
    paths = write_collection(collection, args.out, settings)
    print(collection_report(collection.stats))
    print(f"comparisons: {paths[0]}; Elo table: {paths[1]}; panel statistics: {paths[2]}")
    return collection.stats


def train_rm_cmd(args: argparse.Namespace) -> dict[str, float]:
    """Reward model (RLHF step 2): Bradley-Terry on preference data; the folder is a TextGen-v1 reward."""
    from algorithms.common.distributed import is_main_process
    from algorithms.reward_model import accuracy_report
    from lm_gym.preferences import load_preferences
    from lm_gym.tasks import get_task

    records = load_preferences(args.data)
    gold = None if args.no_gold else get_task(args.task).make_reward()
    # By default the reward model reads what the task's gold scorer reads (VADER: the completion alone).
    include_prompt = args.include_prompt
    if include_prompt is None:
        include_prompt = getattr(gold, "include_prompt", True)
    prepare_run_dir(
        args.out, resume=args.resume, overwrite=args.overwrite, flag="--out", markers=["config.json"]
    )
    result = train_reward_model(
        records,
        model=args.model,
        gold=gold,
        include_prompt=include_prompt,
        out_dir=args.out,
        seed=args.seed,
        checkpoint_dir=Path(args.out) / "checkpoints",
        resume=args.resume,
        log=print,
        **given_settings(args, RM_FLAGS, {}),
    )
    if is_main_process():  # with several processes (accelerate launch), the one that wrote the folder
        print(accuracy_report(result.metrics))
        print(
            f"reward model: {args.out} (use it as reward={args.out}, e.g. lm-gym train --reward {args.out})"
        )
    return result.metrics


def pipeline_cmd(args: argparse.Namespace) -> dict[str, Any]:
    from algorithms.common.distributed import is_main_process
    from algorithms.pipeline import preset_config, run_pipeline

    algorithm = ALGORITHMS[args.algo]
    config = preset_config(
        args.preset,
        algorithm,
        rl_settings=given_settings(args, PIPELINE_RL_FLAGS, {}),
        policy_settings={"lora_r": args.lora_r} if args.lora_r else {},
        **{name: getattr(args, name) for name in args.config_names},
    )
    report = run_pipeline(config, algorithm, args.out, resume=args.resume, overwrite=args.overwrite)
    if is_main_process():  # with several processes (accelerate launch), the one that wrote the report
        print((Path(args.out) / "report.md").read_text())
    return report


# ----------------------------------------------------------------------------------------------- parsers
def add_train_parser(sub: Any) -> dict[str, argparse.Action]:
    """``lm-gym train``; returns its flags (``dest -> action``), which type a ``--config`` file's keys."""
    p = sub.add_parser("train", help="RL fine-tuning of a model on a task")
    p.add_argument("--algo", default=None, choices=sorted(ALGORITHMS), help="the RL algorithm (default ppo)")
    p.add_argument(
        "--model",
        default=None,
        help=f"policy's initial model: tiny, tiny-t5 (encoder-decoder), smollm2-135m, a folder or Hub id "
        f"(default {DEFAULT_MODEL})",
    )
    p.add_argument(
        "--task", default=None, choices=sorted(TASKS), help="prompt set and gold reward (default sentiment)"
    )
    p.add_argument(
        "--reward", default=None, help="reward model name/folder, or 'vader'; default the task's reward"
    )
    p.add_argument(
        "--iterations",
        type=positive_int,
        default=None,
        help="rollout+update iterations in total (default 10)",
    )
    p.add_argument(
        "--run-dir", default="runs/train", help="logs, metrics.jsonl, samples, checkpoints, final model"
    )
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --run-dir")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP.format("--run-dir"))
    p.add_argument("--config", default=None, help="YAML/JSON file of hyperparameters (flags override it)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or metric tables")
    add_device_flags(p)
    seen: set[str] = set()
    p.set_defaults(
        func=train_cmd,
        policy_names=add_flags(p, LMActorCriticPolicy, "policy"),
        core_names=add_flags(p, OnPolicyAlgorithm, "shared on-policy settings", seen=seen),
        algo_names={
            name: add_flags(p, cls, f"{name} (--algo {name})", seen=seen) for name, cls in ALGORITHMS.items()
        },
    )
    flags = flag_actions(p)
    p.set_defaults(flags=flags)
    return flags


def add_demo_parser(sub: Any) -> None:
    p = sub.add_parser("demo", help="the RLHF demo: PPO on sentiment, before/after table and learning curve")
    p.add_argument(
        "--model", default=DEFAULT_MODEL, help="initial model (tiny for a smoke run, with --task letters)"
    )
    p.add_argument(
        "--task",
        default="sentiment",
        choices=sorted(TASKS),
        help="prompt set and gold reward (letters: the toy 'tiny' can learn; VADER scores its bytes 0)",
    )
    p.add_argument(
        "--seeds",
        type=non_negative_int,
        nargs="+",
        default=list(DEMO_SEEDS),
        help="one PPO run per seed; the table shows the mean and spread over them",
    )
    add_flags(p, demo, names=DEMO_FLAGS, types=RANGES, defaults=True)
    p.add_argument("--run-dir", default="runs/demo", help="report, curves; per seed: logs and final model")
    add_device_flags(p)
    p.set_defaults(func=demo_cmd)


def add_eval_parser(sub: Any) -> None:
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
    add_flags(p, evaluate, names=EVAL_FLAGS, types=RANGES, defaults=True)
    p.add_argument("--show", type=non_negative_int, default=5, help="print this many sample texts")
    add_device_flags(p)
    p.set_defaults(func=evaluate_cmd)


def add_benchmark_parser(sub: Any, train_flags: dict[str, argparse.Action]) -> None:
    def preset(key: str) -> str:  # the grid preset's value of a flag left out
        return f"(default {GRID[key]}; with --quick {GRID_QUICK[key]})"

    p = sub.add_parser(
        "benchmark",
        help="run a grid of algorithms x seeds on a task; tables (md, csv) and plots (resumable)",
    )
    p.add_argument(
        "--algos",
        default=",".join(ALGORITHMS),
        help=f"comma-separated, among {', '.join(ALGORITHMS)} (default all of these) and the named recipes "
        f"{', '.join(RECIPES)} (docs/algorithms.md)",
    )
    p.add_argument(
        "--task",
        default=None,
        choices=sorted(TASKS),
        help=f"prompt set and gold scorer {preset('task')}",
    )
    p.add_argument("--seeds", type=positive_int, default=3, help="seeds per algorithm (0, 1, ...)")
    p.add_argument("--model", default=None, help=f"initial model of every run {preset('model')}")
    p.add_argument("--reward", default=None, help="reward model name/folder (default: the task's)")
    p.add_argument(
        "--iterations", type=positive_int, default=None, help=f"iterations per run {preset('iterations')}"
    )
    p.add_argument(
        "--eval-prompts",
        type=positive_int,
        default=None,
        help=f"held-out prompts per run {preset('eval_prompts')}",
    )
    p.add_argument(
        "--config",
        default=None,
        help="YAML of settings for every algorithm, with optional per-algorithm sections (e.g. 'ppo: {n_epochs: 2}')",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"tiny model, toy 'letters' task, {GRID_QUICK['iterations']} iterations: minutes (teaching, CI "
        "smoke test)",
    )
    p.add_argument("--out", default="runs/benchmark", help="results folder; finished cells are not rerun")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="run nothing: write the tables and plots of the cells finished so far",
    )
    add_device_flags(p)
    p.set_defaults(func=benchmark_cmd, flags=train_flags)  # its config holds train's hyperparameters


def add_sft_parser(sub: Any) -> None:
    p = sub.add_parser("sft", help="supervised fine-tuning on demonstrations (RLHF step 1)")
    p.add_argument(
        "--model", default=DEFAULT_MODEL, help="model to fine-tune: tiny, smollm2-135m, a folder or Hub id"
    )
    p.add_argument(
        "--data",
        default=SENTIMENT_DEMOS,
        help="demonstrations: .jsonl/.json/.csv/.parquet file or Hub dataset; records with 'text', or "
        "'prompt' and 'completion'/'response' (default: the shipped sentiment demonstrations)",
    )
    p.add_argument(
        "--eval-data", default=None, help="held-out demonstrations (default: --eval-fraction of --data)"
    )
    p.add_argument("--text-field", default="text", help="field of a whole-text demonstration")
    p.add_argument(
        "--prompt-field", default="prompt", help="field of the prompt (its tokens are not targets)"
    )
    p.add_argument(
        "--completion-field", default=None, help="field of the completion (default completion or response)"
    )
    p.add_argument(
        "--output-dir",
        default="runs/sft",
        help="the fine-tuned model folder (safetensors, tokenizer, metrics)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the latest epoch checkpoint in OUTPUT_DIR/checkpoints (same settings and data)",
    )
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP.format("--output-dir"))
    p.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    p.set_defaults(func=sft_cmd, sft_names=add_flags(p, SFT, "SFT"))


def add_collect_parser(sub: Any) -> None:
    p = sub.add_parser(
        "collect", help="preference data: K completions per prompt ranked by a simulated panel"
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help="the model whose completions are compared")
    p.add_argument(
        "--task", default="sentiment", choices=sorted(TASKS), help="prompts, and the gold scorer of the panel"
    )
    p.add_argument("--split", default="train", choices=["train", "eval", "all"], help="which prompts")
    p.add_argument(
        "--num-prompts", type=positive_int, default=None, help="use the first N prompts (default all)"
    )
    add_flags(p, collect_preferences, names=COLLECT_FLAGS, types=RANGES, defaults=True)
    p.add_argument(
        "--aggregate",
        default="majority",
        choices=list(AGGREGATES),
        help="how the panel's rankings become labels: per-pair majority of all annotators, one Borda "
        "ranking, or one random annotator per prompt (default majority)",
    )
    p.add_argument(
        "--out", default="prefs.jsonl", help="records (JSONL); also writes OUT.elo.jsonl and OUT.meta.json"
    )
    add_flags(p, AnnotatorPanel, names=["min_agreement"], types={"min_agreement": float}, defaults=True)
    p.add_argument("--seed", type=non_negative_int, default=0, help="seeds the sampling and the panel")
    p.set_defaults(func=collect_cmd)


def add_train_rm_parser(sub: Any) -> None:
    p = sub.add_parser("train-rm", help="train a reward model (Bradley-Terry) on preference data")
    p.add_argument(
        "--data", required=True, help="preference JSONL (prompt/chosen/rejected), or a datasets name"
    )
    p.add_argument(
        "--model", default="minilm-l6", help="backbone: minilm-l6, a folder or Hub id (gets a 1-output head)"
    )
    p.add_argument("--out", required=True, help="reward-model folder; TextGen-v1 takes it as reward=OUT")
    add_flags(
        p,
        train_reward_model,
        names=RM_FLAGS,
        types=RANGES,
        flag_names={"learning_rate": "lr"},
    )
    p.add_argument(
        "--seed", type=non_negative_int, default=0, help="seeds the head, the split and the batch order"
    )
    p.add_argument(
        "--task", default="sentiment", choices=sorted(TASKS), help="its gold scorer judges the held-out pairs"
    )
    p.add_argument("--no-gold", action="store_true", help="report accuracy against the labels only")
    p.add_argument(
        "--include-prompt",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="score prompt + completion, or the completion alone (default: as the task's gold scorer does; "
        "sentiment: the completion alone); recorded in OUT/reward_model.json for the env",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the latest epoch checkpoint in OUT/checkpoints (same settings and data)",
    )
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP.format("--out"))
    p.set_defaults(func=train_rm_cmd)


def add_pipeline_parser(sub: Any) -> None:
    p = sub.add_parser(
        "pipeline",
        help="the three RLHF steps chained: collect preferences -> train-rm -> RL, iterated with --rounds",
    )
    p.add_argument(
        "--preset",
        default="default",
        choices=list(PIPELINE_PRESETS),
        help="default: RLHF on the embedded model; overoptimize: no KL penalty, more steps (shows the proxy "
        "rising while gold peaks); quick: tiny model, toy task, seconds",
    )
    p.add_argument("--algo", default="ppo", choices=sorted(ALGORITHMS), help="the RL algorithm of step 3")
    skip = {"rl_settings", "policy_settings"}  # the next flags set some of them
    config_names = add_flags(p, PipelineConfig, skip=skip, default_help="default: {}, or the preset's")
    add_flags(p, OnPolicyAlgorithm, names=PIPELINE_RL_FLAGS, default_help="default: the preset's")
    add_flags(p, LMActorCriticPolicy, names=["lora_r"])
    p.add_argument("--out", default="runs/pipeline", help="preferences, reward models, RL runs, report")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run in --out (same settings): finished rounds and evaluations are "
        "read back, the RL from its latest checkpoint",
    )
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP.format("--out"))
    p.set_defaults(func=pipeline_cmd, config_names=config_names)


def build_parser() -> argparse.ArgumentParser:
    """The ``lm-gym`` parser: one subcommand per step of RL fine-tuning and RLHF."""
    parser = argparse.ArgumentParser(
        prog="lm-gym", description="RL fine-tuning of language models on TextGen-v1"
    )
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True)
    train_flags = add_train_parser(sub)
    add_demo_parser(sub)
    add_eval_parser(sub)
    add_benchmark_parser(sub, train_flags)
    add_sft_parser(sub)
    add_collect_parser(sub)
    add_train_rm_parser(sub)
    add_pipeline_parser(sub)
    for command in sub.choices.values():  # also after the command: lm-gym train ... --debug
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Run ``lm-gym`` with ``argv`` (default the command line's); a user's mistake exits with one line.

    Args:
        argv: the arguments after ``lm-gym``.
    """
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        args.func(args)
    except USER_ERRORS as err:
        if args.debug:
            raise
        message = " ".join(str(err).split()) or type(err).__name__  # a multi-line message on one line
        sys.exit(f"lm-gym {args.command}: error: {message}")
    from algorithms.common.distributed import is_main_process

    if is_main_process():
        print(f"done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
