"""Whole RL iterations against TRL's ``GRPOTrainer``: samples per second, side by side, alternating.

Every side does the same work per optimizer step on the same model, prompts and reward, in float32:
``--completions`` texts of at most ``--new-tokens`` tokens (``--group-size`` per prompt), the VADER reward,
beta ``--kl-coef`` against a frozen reference, one optimizer step per batch.

* TRL 1.16 ``GRPOTrainer``: its defaults (DAPO's token-mean loss, k3 KL in the loss with a reference copy),
  ``num_generations = group size``, ``per_device_train_batch_size = completions``;
* lm-gym ``GRPO``: the same loss (``aggregation="dapo"``, k3 in the loss: one teacher-forced reference pass,
  no per-token reference), one forward/backward over the whole batch;
* lm-gym ``PPO``: one epoch, one minibatch (it also trains a value head and prices every token with the
  reference as it is taken).

The sides run in blocks of ``--steps`` steps, alternating, for ``--rounds`` rounds; each block's first step is
a warm-up and not counted. Per side: the median step time over the counted steps. The last line is the GRPO
ratio (ours / TRL, samples per second). TRL is a benchmark dependency only (``pip install -e ".[bench]"``, or ``.[dev]``).

    python benchmarks/vs_trl.py --model smollm2-135m
    python benchmarks/vs_trl.py --model tiny --completions 4 --group-size 2 --new-tokens 4 --steps 2 --rounds 1
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable

import numpy as np
import torch

from algorithms.grpo import GRPO
from algorithms.policy import LMActorCriticPolicy
from algorithms.ppo import PPO
from lm_gym.models import load_causal_lm
from lm_gym.rewards import make_reward
from lm_gym.tasks import get_task


def trl_steps(folder: str, prompts: list[str], reward: Callable, args: argparse.Namespace) -> list[float]:
    """One block of TRL GRPO steps on the model saved in ``folder``; the seconds of each step."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    class StepTimes(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_step_begin(self, *_, **__) -> None:
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__) -> None:
            self.times.append(time.perf_counter() - self.start)

    def vader(prompts: list[str], completions: list[str], **_) -> list[float]:
        return [float(s) for s in reward(prompts, completions)]

    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=args.completions,
        num_generations=args.group_size,
        max_completion_length=args.new_tokens,
        beta=args.kl_coef,
        learning_rate=args.learning_rate,
        max_steps=args.steps,
        temperature=1.0,
        use_cpu=True,
        bf16=False,
        report_to=[],
        save_strategy="no",
        logging_steps=args.steps,
        disable_tqdm=True,
        seed=0,
    )
    times = StepTimes()
    trainer = GRPOTrainer(
        model=folder,
        reward_funcs=[vader],
        args=config,
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        callbacks=[times],
    )
    trainer.train()
    return times.times


def our_steps(algo, steps: int) -> list[float]:
    """``steps`` more iterations of an lm-gym algorithm; the seconds of each (rollout and update)."""
    out = []
    for _ in range(steps):
        start = time.perf_counter()
        algo.learn(algo.iteration + 1, export=False)
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=32, help="the first prompts of the sentiment task")
    parser.add_argument("--completions", type=int, default=16, help="texts per optimizer step")
    parser.add_argument("--group-size", type=int, default=8, help="texts per prompt")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--kl-coef", type=float, default=0.05)
    parser.add_argument("--learning-rate", type=float, default=1e-6)
    parser.add_argument("--steps", type=int, default=5, help="steps per block (the first is a warm-up)")
    parser.add_argument("--rounds", type=int, default=2, help="blocks per side, alternating")
    args = parser.parse_args()

    prompts = list(get_task("sentiment").prompts("train"))[: args.prompts]
    reward = make_reward("vader")
    model, tokenizer = load_causal_lm(args.model)
    folder = tempfile.mkdtemp()  # TRL loads the policy and its reference copy from a folder
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    shared = dict(
        prompts=prompts,
        reward=reward,
        n_envs=args.completions,
        max_new_tokens=args.new_tokens,
        kl_coef=args.kl_coef,
        learning_rate=args.learning_rate,
        verbose=0,
    )
    sides: dict[str, Callable[[], list[float]]] = {
        "trl_grpo": lambda: trl_steps(folder, prompts, reward, args),
    }
    grpo = GRPO(
        LMActorCriticPolicy(*load_causal_lm(folder)),
        group_size=args.group_size,
        aggregation="dapo",
        micro_batch_size=args.completions,
        **shared,
    )
    ppo = PPO(LMActorCriticPolicy(*load_causal_lm(folder)), n_epochs=1, batch_size=args.completions, **shared)
    sides["grpo"] = lambda: our_steps(grpo, args.steps)
    sides["ppo"] = lambda: our_steps(ppo, args.steps)

    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(args.rounds):
        for name, run in sides.items():
            times[name] += run()[1:]  # the block's first step warms up (allocator, optimizer state)
    grpo.close()
    ppo.close()
    print(
        f"model={args.model} completions={args.completions} group={args.group_size} new_tokens={args.new_tokens} "
        f"beta={args.kl_coef} threads={torch.get_num_threads()} cpu={torch.backends.cpu.get_cpu_capability()}"
    )
    median = {name: float(np.median(values)) for name, values in times.items()}
    for name, values in times.items():
        print(
            f"{name:9s}: median {median[name]:7.2f} s/step, {args.completions / median[name]:6.2f} samples/s; "
            f"steps {np.round(values, 2).tolist()}"
        )
    print(f"ratio ours/trl (PPO, samples/s): {median['trl_grpo'] / median['ppo']:.2f}")
    print(f"ratio ours/trl (GRPO, samples/s): {median['trl_grpo'] / median['grpo']:.2f}")


if __name__ == "__main__":
    main()
