"""The whole RLHF pipeline: collect preferences -> train a reward model -> RL against it, iterated.

Round ``r`` (Anthropic 2022's iterated online RLHF when ``rounds > 1``):

1. the current policy (the initial model in round 0) writes ``k`` completions for fresh training prompts and
   the annotator panel ranks them (:func:`lm_gym.preferences.collect_preferences`);
2. a reward model is trained from scratch on every comparison collected so far
   (:func:`algorithms.reward_model.train_reward_model`), and its held-out accuracy against the panel and the
   gold scorer is recorded;
3. the policy continues RL against that reward model (any algorithm of the zoo), the KL always measured to
   the *initial* model. Every ``eval_every`` iterations the policy is scored on held-out prompts by the
   learned reward model (the proxy), the gold scorer and the KL.

The report (``report.md``, ``report.json``, ``overoptimization.png``) puts proxy and gold reward against
``sqrt(KL)``, where over-optimization shows (Gao et al. 2022: the proxy keeps rising while the gold score
peaks and falls), and an Elo table of the policy checkpoints of all rounds judged by the panel.

Under ``accelerate launch``/``torchrun`` every step is data parallel: the sampling of the compared completions
is shared out by batch of prompts and gathered (the panel then ranks them identically in every process, so
the comparisons are one process's), the reward model and the RL are trained data parallel, and the
evaluations run identically everywhere; only the main process logs and writes files.

**Resume** (``resume=True``, ``lm-gym pipeline --resume``): ``pipeline_state.json`` in the output folder,
rewritten atomically after every step (the collection, the reward model, each evaluation, each round), says
what is done. Finished rounds are not redone (their comparisons are read back from ``preferences.jsonl``, the
policy from the round's last RL checkpoint); in the interrupted round a finished collection or reward model
is read back from disk, an interrupted reward-model training continues from its epoch checkpoint, and the RL
from its latest checkpoint (every evaluation point has one). On CPU the report's points and the final
weights are those of the uninterrupted run. A resume with other settings is refused, and so is a new run in a
folder that holds one (unless ``overwrite``, which deletes it first).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from algorithms.common.checkpoints import (
    check_same_settings,
    latest_checkpoint,
    load_weights,
    prepare_run_dir,
    write_folder,
    write_json_atomic,
)
from algorithms.common.distributed import ProcessGroup
from algorithms.common.nonfinite import check_finite
from algorithms.common.on_policy import POLICY_FILE, OnPolicyAlgorithm
from algorithms.flags import parameters
from algorithms.policy import LMActorCriticPolicy
from algorithms.presets import PIPELINE_PRESETS

__all__ = ["PipelineConfig", "preset_config", "run_pipeline"]

STATE = "pipeline_state.json"  # what is done: persisted after every step, read back by a resumed run
SAMPLES_SHOWN = 3  # held-out texts kept per evaluation point (the report shows the first and last point's)


@dataclass
class PipelineConfig:
    """Settings of :func:`run_pipeline`.

    Args:
        model: the initial policy (step 1's output: a name, or the folder ``lm-gym sft`` wrote).
        task: prompts and gold scorer (the panel's annotators are built on the gold scorer).
        rounds: collect -> reward model -> RL rounds.
        collect_prompts: training prompts per round (fresh ones each round while they last).
        k: completions per prompt (each ranking gives k(k-1)/2 comparisons).
        collect_max_new_tokens: length of the compared completions.
        rm_model: the reward model's backbone (a name, folder or Hub id).
        rm_epochs: reward-model epochs.
        rm_learning_rate: reward-model learning rate.
        rm_batch_size: comparisons per reward-model step (None: one prompt's K(K-1)/2 per step).
        iterations: RL iterations per round.
        eval_every: RL iterations between evaluations (the points of the over-optimization plot).
        eval_prompts: held-out prompts per evaluation and per Elo game round.
        rl_settings: keyword arguments of the algorithm (``n_envs``, ``kl_coef``, ``learning_rate``...).
        policy_settings: keyword arguments of :class:`~algorithms.policy.LMActorCriticPolicy`.
        seed: seeds everything.
    """

    model: str = "smollm2-135m"
    task: str = "sentiment"
    rounds: int = 1
    collect_prompts: int = 400
    k: int = 24
    collect_max_new_tokens: int = 16
    rm_model: str = "minilm-l6"
    rm_epochs: int = 3
    rm_learning_rate: float = 1e-4
    rm_batch_size: int | None = None
    iterations: int = 10
    eval_every: int = 2
    eval_prompts: int = 32
    rl_settings: dict[str, Any] = field(default_factory=dict)
    policy_settings: dict[str, Any] = field(default_factory=dict)
    seed: int = 0

    def check(self) -> None:
        for name in ("rounds", "collect_prompts", "rm_epochs", "rm_batch_size", "iterations", "eval_every"):
            value = getattr(self, name)
            if name == "rm_batch_size" and value is None:
                continue
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name} must be an integer >= 1; got {value!r}")
        if not (isinstance(self.k, int) and self.k >= 2):
            raise ValueError(f"k must be an integer >= 2 (completions compared per prompt); got {self.k!r}")
        if self.eval_prompts < 2:
            raise ValueError(f"eval_prompts must be >= 2; got {self.eval_prompts!r}")


def preset_config(
    preset: str,
    algorithm: type[OnPolicyAlgorithm],
    *,
    rl_settings: dict[str, Any] | None = None,
    policy_settings: dict[str, Any] | None = None,
    **settings: Any,
) -> PipelineConfig:
    """``lm-gym pipeline``'s config: the preset named ``preset`` (:data:`~algorithms.presets.PIPELINE_PRESETS`)
    with what is given on top.

    Args:
        preset: ``default``, ``overoptimize`` or ``quick``.
        algorithm: the RL algorithm of step 3: the preset's RL settings it does not take are left out (a
            preset's PPO epochs are not A2C's arguments).
        rl_settings: keyword arguments of the algorithm, on top of the preset's.
        policy_settings: keyword arguments of :class:`~algorithms.policy.LMActorCriticPolicy`.
        **settings: other fields of :class:`PipelineConfig`; None: the preset's.
    """
    chosen = PIPELINE_PRESETS[preset]
    fields = {k: v for k, v in chosen.items() if k != "rl_settings"}
    fields.update({k: v for k, v in settings.items() if v is not None})
    rl = {**chosen.get("rl_settings", {}), **(rl_settings or {})}
    accepted = {q.name for q in parameters(OnPolicyAlgorithm) + parameters(algorithm)}
    rl = {k: v for k, v in rl.items() if k in accepted}
    return PipelineConfig(**fields, rl_settings=rl, policy_settings=dict(policy_settings or {}))


def run_pipeline(
    config: PipelineConfig,
    algorithm: type[OnPolicyAlgorithm],
    out_dir: str | Path,
    log: Callable[[str], Any] = print,
    resume: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run ``config.rounds`` rounds of collect -> reward model -> RL; write and return the report.

    Args:
        config: the settings.
        algorithm: the RL algorithm of step 3.
        out_dir: the run's folder (preferences, reward models, RL runs, report).
        log: where progress lines go.
        resume: continue the interrupted run in ``out_dir`` (see the module's docstring): the same settings
            are required.
        overwrite: delete a run already in ``out_dir`` first (without it, or ``resume``, one is refused).
    """
    from algorithms.reward_model import train_reward_model
    from lm_gym.evaluation import evaluate
    from lm_gym.models import load_causal_lm, load_sequence_classifier
    from lm_gym.preferences import AnnotatorPanel, collect_preferences, load_preferences, write_collection
    from lm_gym.preferences.collect import sample_completions
    from lm_gym.rewards import HFRewardModel
    from lm_gym.tasks import get_task

    config.check()
    out_dir = prepare_run_dir(out_dir, resume=resume, overwrite=overwrite, flag="--out", markers=[STATE])
    start = time.perf_counter()
    settings = _flat_settings({"algo": algorithm.__name__, **asdict(config)})
    saved = _saved_state(out_dir, settings) if resume else None
    task = get_task(config.task)
    gold = task.make_reward()
    # the reward model reads what the gold scorer reads (VADER: the completion alone)
    include_prompt = getattr(gold, "include_prompt", True)
    panel = AnnotatorPanel(gold, seed=config.seed)
    model, tokenizer = load_causal_lm(config.model, seed=config.seed)
    policy = LMActorCriticPolicy(model, tokenizer, **config.policy_settings)
    group = ProcessGroup(policy.device)  # alone: every collective is the identity
    main = group.is_main_process  # with several processes (accelerate launch), the one that writes
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        config_text = json.dumps({"algo": algorithm.__name__, **asdict(config)}, indent=2)
        (out_dir / "config.json").write_text(config_text)
    else:
        log = lambda *_: None  # noqa: E731
    reference = None if policy.adapter else policy.reference_copy()  # the anchor of every round's KL
    eval_reference = reference if reference is not None else load_causal_lm(config.model, seed=config.seed)[0]
    train_prompts = list(task.prompts("train"))
    order = np.random.default_rng(config.seed).permutation(len(train_prompts))
    eval_prompts = list(task.prompts("eval"))[: config.eval_prompts]
    max_new_tokens = config.rl_settings.get("max_new_tokens", 48)

    records, rounds, points = [], [], []
    snapshots: dict[str, list[str]] = {}  # checkpoint name -> one completion per eval prompt (the Elo games)
    current: dict[str, Any] = {}  # the round under way: what of it is done
    elapsed_before = 0.0

    def persist() -> None:
        """Record what is done (the main process; atomically), so that a resumed run picks up from here."""
        if main:
            state = dict(settings=settings, world_size=group.world_size, snapshots=snapshots, points=points)
            state.update(rounds=rounds, current=current, elapsed=elapsed_before + time.perf_counter() - start)
            state["panel_rng"] = panel.rng.bit_generator.state  # the panel's draws go on where they were
            write_json_atomic(out_dir / STATE, state)

    def snapshot(name: str) -> None:
        _, texts = sample_completions(
            policy.model, tokenizer, eval_prompts, 1, max_new_tokens=max_new_tokens, seed=config.seed
        )
        snapshots[name] = [t[0] for t in texts]

    if saved is None:
        snapshot("initial")
        persist()
    else:
        snapshots, points, rounds = saved["snapshots"], saved["points"], saved["rounds"]
        current, elapsed_before = saved["current"] or {}, saved["elapsed"]
        panel.rng.bit_generator.state = saved["panel_rng"]
        for k in range(len(rounds)):
            records += load_preferences(out_dir / f"round_{k}" / "preferences.jsonl")
        if rounds:  # the policy as the last finished round left it
            _load_policy_weights(policy, out_dir / f"round_{len(rounds) - 1}" / "rl", config.iterations)
        log(f"resuming {out_dir}: {len(rounds)} round(s) done, {len(points)} evaluation(s) read back")
    for r in range(len(rounds), config.rounds):
        round_dir = out_dir / f"round_{r}"
        iteration = r * config.iterations  # the RL iterations of the rounds before
        if current.get("round") != r:
            current = {"round": r}
        # 1. preferences from the current policy, on prompts not used by earlier rounds while they last
        if "panel" in current:  # collected before the interruption
            round_records = load_preferences(round_dir / "preferences.jsonl")
        else:
            picks = [
                train_prompts[order[(r * config.collect_prompts + i) % len(order)]]
                for i in range(config.collect_prompts)
            ]
            log(
                f"round {r}: collecting {config.k} completions for {len(picks)} prompts; the panel ranks them"
            )
            sampling = dict(k=config.k, max_new_tokens=config.collect_max_new_tokens, seed=config.seed + r)
            if group.distributed:  # the same comparisons, the sampling shared out
                collection = _collect_sharded(group, policy.model, tokenizer, picks, panel, **sampling)
            else:
                collection = collect_preferences(policy.model, tokenizer, picks, panel, **sampling)
            if main:
                write_collection(collection, round_dir / "preferences.jsonl")
            round_records = collection.records
            current.update(comparisons=len(round_records), panel=collection.stats)
            persist()
        records += round_records

        # 2. the reward model, from scratch on everything so far
        if "reward_model" in current:  # trained before the interruption
            rm_model, rm_tokenizer = load_sequence_classifier(str(round_dir / "reward_model"))
        else:
            log(f"round {r}: training the reward model on {len(records)} comparisons")
            rm_checkpoints = round_dir / "reward_model_checkpoints"
            resume_rm = saved is not None and latest_checkpoint(rm_checkpoints) is not None
            if main and not resume_rm:  # an earlier run's, if any
                shutil.rmtree(rm_checkpoints, ignore_errors=True)
            rm = train_reward_model(
                records,
                model=config.rm_model,
                epochs=config.rm_epochs,
                learning_rate=config.rm_learning_rate,
                batch_size=config.rm_batch_size,
                gold=gold,
                include_prompt=include_prompt,
                out_dir=round_dir / "reward_model",
                seed=config.seed + r,
                checkpoint_dir=rm_checkpoints,
                resume=resume_rm,
                log=None,
            )
            rm_model, rm_tokenizer = rm.model, rm.tokenizer
            current["reward_model"] = rm.metrics
            persist()
            if main:  # the folder is written: its epoch checkpoints are of no more use
                shutil.rmtree(rm_checkpoints, ignore_errors=True)
        proxy = HFRewardModel(rm_model, rm_tokenizer, include_prompt=include_prompt)

        # 3. RL against it, evaluated every eval_every iterations
        algo = algorithm(
            policy,
            task=task,
            reward=proxy,
            reference=reference,
            run_dir=round_dir / "rl",
            verbose=0,
            seed=config.seed + 1000 * r,
            **config.rl_settings,
        )
        measured = {q["iteration"] - iteration for q in points if q["round"] == r}
        if measured and latest_checkpoint(round_dir / "rl" / "checkpoints") is not None:
            algo.load_checkpoint(round_dir / "rl")  # every evaluated iteration has a checkpoint
            log(f"round {r}: RL resumed from iteration {algo.iteration}")
        elif main:  # a fresh start: an interrupted attempt's checkpoints and logs must not be mixed in
            shutil.rmtree(round_dir / "rl", ignore_errors=True)

        def measure(it: int, round_index: int = r, reward=proxy) -> None:
            result = evaluate(
                policy.model,
                tokenizer,
                reference=eval_reference,
                task=task,
                reward=reward,
                prompts=eval_prompts,
                max_new_tokens=max_new_tokens,
                seed=config.seed,
            )
            m = result.metrics
            samples = [
                {"prompt": prompt, "completion": text, "proxy": score, "gold": gold_score}
                for prompt, text, score, gold_score, _ in result.samples[:SAMPLES_SHOWN]
            ]
            points.append(
                {
                    "round": round_index,
                    "iteration": it,
                    "proxy": m["score"],
                    "gold": m["gold"],
                    "kl": m["kl"],
                    "samples": samples,
                }
            )
            persist()
            log(
                f"round {round_index} iteration {it}: proxy {m['score']:+.3f} gold {m['gold']:+.3f} KL {m['kl']:.2f}"
            )

        targets = list(range(config.eval_every, config.iterations + 1, config.eval_every))
        if config.iterations % config.eval_every:
            targets.append(config.iterations)
        for target in [0, *targets]:
            if target in measured:  # evaluated before the interruption
                continue
            if target:
                algo.learn(target, export=False)  # ends with a checkpoint at iteration `target`
            measure(iteration + target)
        algo.close()
        snapshot(f"round_{r}")
        rounds.append(
            {
                "round": r,
                "comparisons": current["comparisons"],
                "comparisons_total": len(records),
                "panel": current["panel"],
                "reward_model": current["reward_model"],
            }
        )
        current = {}
        persist()

    elo = _elo_table(snapshots, eval_prompts, panel)
    wall = elapsed_before + time.perf_counter() - start
    report = {"rounds": rounds, "points": points, "elo": elo, "wall_time_s": wall}
    if main:
        check_finite(policy.named_parameters(), f"model {out_dir / 'final'}")
        write_folder(out_dir / "final", policy.save_pretrained)
        (out_dir / "report.json").write_text(json.dumps(report, indent=1, default=float))
        (out_dir / "report.md").write_text(_markdown(report, config, algorithm.__name__))
        _plot(points, out_dir / "overoptimization.png")
        log(f"report: {out_dir / 'report.md'}; plot: {out_dir / 'overoptimization.png'}")
    group.barrier()  # every process returns with the report written
    return report


def _flat_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """The run's settings as JSON values, nested ones named ``rl_settings.kl_coef``: what a resume compares."""
    flat: dict[str, Any] = {}
    for key, value in json.loads(json.dumps(settings, default=str)).items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


def _saved_state(out_dir: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """The state of the run in ``out_dir`` to resume, checked to have the same settings."""
    path = out_dir / STATE
    if not path.is_file():
        raise FileNotFoundError(f"no pipeline run to resume in {out_dir} ({STATE} is missing)")
    state = json.loads(path.read_text())
    check_same_settings(
        state["settings"], settings, str(out_dir), "resume with the same settings, or use another --out"
    )
    return state


def _load_policy_weights(policy: LMActorCriticPolicy, run_dir: Path, iteration: int) -> None:
    """Set the policy's trainable weights (the adapters, or every weight, and the critic) to those of the
    latest RL checkpoint in ``run_dir``, which must be at ``iteration``: the end of a finished round."""
    import torch

    checkpoint = latest_checkpoint(run_dir / "checkpoints")
    state = json.loads((checkpoint / "state.json").read_text()) if checkpoint is not None else {}
    if state.get("iteration") != iteration:
        raise FileNotFoundError(f"no checkpoint of the finished RL at iteration {iteration} in {run_dir}")
    params = dict(policy.named_parameters())
    weights = load_weights(checkpoint / POLICY_FILE, policy.trainable_state_dict(), policy.device, "policy")
    with torch.no_grad():  # float32 values: rounded into low-precision weights as the optimizer step does
        for name, value in weights.items():
            params[name].copy_(value)


COLLECT_BATCH = 64  # sequences sampled side by side (collect_preferences' default)


def _collect_sharded(group: ProcessGroup, model, tokenizer, prompts: list[str], panel, *, k: int, **sampling):
    """``collect_preferences`` over several processes, with the same result as one process's: batch ``b``
    of the prompts (sampled with seed ``seed + b``, as ``sample_completions`` seeds it) is sampled by process
    ``b mod N``, the completions are gathered in every process, and each has the panel rank them (the same
    panel, seed and calls everywhere, so the same records)."""
    from lm_gym.preferences.collect import rank_completions, sample_completions

    seed = sampling.pop("seed")
    per_batch = max(1, COLLECT_BATCH // k)
    mine = {
        b: sample_completions(
            model,
            tokenizer,
            prompts[start : start + per_batch],
            k,
            batch_size=COLLECT_BATCH,
            seed=seed + b,
            **sampling,
        )
        for b, start in enumerate(range(0, len(prompts), per_batch))
        if b % group.world_size == group.rank
    }
    parts = {b: part for shard in group.gather(mine) for b, part in shard.items()}
    seen = [p for b in sorted(parts) for p in parts[b][0]]
    sampled = [c for b in sorted(parts) for c in parts[b][1]]
    return rank_completions(seen, sampled, panel)


def _elo_table(snapshots: dict[str, list[str]], prompts: list[str], panel) -> list[dict[str, Any]]:
    """The panel ranks, per held-out prompt, the checkpoints' completions; Elo over all those games."""
    from lm_gym.preferences import Game, elo_ratings
    from lm_gym.preferences.data import ranking_to_pairs

    names = list(snapshots)
    judgements = panel.judge(prompts, [[snapshots[n][i] for n in names] for i in range(len(prompts))])
    games = [
        Game(names[w], names[lo], 1.0)
        for j in judgements
        for a in j.labellers
        for w, lo in ranking_to_pairs(j.ranks[a])
    ]
    ratings = elo_ratings(games)
    gold = {n: float(np.mean([j.gold[k] for j in judgements])) for k, n in enumerate(names)}
    return [{"checkpoint": n, "elo": ratings.get(n, float("nan")), "gold": gold[n]} for n in names]


def _markdown(report: dict[str, Any], config: PipelineConfig, algo: str) -> str:
    lines = [
        f"# RLHF pipeline: {config.model} on {config.task}, {algo}, {config.rounds} round(s)",
        "",
        "| round | comparisons (total) | inter-annotator agreement | panel vs gold | RM accuracy vs panel "
        "(held-out) | RM accuracy vs gold (held-out) |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["rounds"]:
        p, m = r["panel"], r["reward_model"]
        lines.append(
            f"| {r['round']} | {r['comparisons']} ({r['comparisons_total']}) | {p.get('inter_annotator', float('nan')):.3f} "
            f"| {p.get('panel_gold', float('nan')):.3f} | {m.get('eval/accuracy', float('nan')):.3f} "
            f"| {m.get('eval/accuracy_gold', float('nan')):.3f} |"
        )
    lines += [
        "",
        "| round | iteration | proxy (learned RM) | gold | KL (nats/text) | sqrt(KL) |",
        "|---|---|---|---|---|---|",
    ]
    for q in report["points"]:
        lines.append(
            f"| {q['round']} | {q['iteration']} | {q['proxy']:+.3f} | {q['gold']:+.3f} | {q['kl']:.2f} "
            f"| {math.sqrt(max(q['kl'], 0.0)):.2f} |"
        )
    shown = [q for q in (report["points"][:1] + report["points"][-1:]) if q.get("samples")]
    if len(shown) == 2 and shown[0] is not shown[1]:
        lines += ["", "Held-out samples at the first and the last evaluation (prompt + *completion*):", ""]
        for q in shown:
            lines.append(f"- round {q['round']}, iteration {q['iteration']}, KL {q['kl']:.1f}:")
            for x in q["samples"]:
                completion = " ".join(x["completion"].split()).replace("|", "/")
                lines.append(
                    f"  - {x['prompt']} *{completion}* (proxy {x['proxy']:+.2f}, gold {x['gold']:+.2f})"
                )
    lines += ["", "| checkpoint | Elo (panel) | gold (mean) |", "|---|---|---|"]
    for row in report["elo"]:
        lines.append(f"| {row['checkpoint']} | {row['elo']:.0f} | {row['gold']:+.3f} |")
    lines += [
        "",
        f"Wall time {report['wall_time_s']:.0f} s. ![proxy and gold against sqrt(KL)](overoptimization.png)",
    ]
    return "\n".join(lines) + "\n"


def _plot(points: list[dict[str, Any]], path: Path) -> None:
    """Proxy and gold reward against sqrt(KL) (Gao et al.'s axis) and, since the KL need not grow
    monotonically, against the RL iteration as well."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    rounds = sorted({q["round"] for q in points})
    for r in rounds:
        mine = [q for q in points if q["round"] == r]
        suffix = f" (round {r})" if len(rounds) > 1 else ""
        alpha = 0.4 + 0.6 * (r + 1) / len(rounds)
        xs = ([math.sqrt(max(q["kl"], 0.0)) for q in mine], [q["iteration"] for q in mine])
        for ax, x in zip(axes, xs, strict=True):
            proxy = [q["proxy"] for q in mine]
            ax.plot(
                x, proxy, "o-", color="tab:blue", alpha=alpha, label="proxy: learned reward model" + suffix
            )
            gold = [q["gold"] for q in mine]
            ax.plot(x, gold, "s-", color="tab:orange", alpha=alpha, label="gold scorer" + suffix)
    axes[0].set(
        xlabel="sqrt(KL to the initial model)",
        ylabel="reward on held-out prompts",
        title="proxy and gold reward against sqrt(KL)",
    )
    axes[1].set(xlabel="RL iteration (all rounds)", title="... and against the iteration")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
