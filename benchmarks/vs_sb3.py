"""Training throughput: lm-gym's PPO against unmodified stable-baselines3 PPO with ``LMSB3Policy``.

Both sides train the same model on the same ``TextGen-v1`` settings (task, KL coefficient, prompt and
episode lengths, ``--n-envs`` environments) for the same per-token reward, ``score - kl_coef * (log pi -
log pi_ref)`` (the env pays the reference's half; ours adds the agent's half in its rollout, SB3's side with
``algorithms.sb3.KLRewardCallback``), with the same PPO settings (epochs, clip ranges, value
coefficient, learning rate, gamma 1.0, GAE lambda 0.95, advantage whitening, gradient clip); a minibatch
holds about the same number of actions (``--batch-seqs`` whole sequences on our side,
``min(--batch-seqs, --n-envs) * --new-tokens`` transitions on SB3's).

* ours: ``algorithms.ppo.PPO`` with ``algorithms.policy.LMActorCriticPolicy``: KV-cached batched sampling
  through the native vector env, one teacher-forced forward per sequence in the update.
* sb3: ``stable_baselines3.PPO`` with ``algorithms.sb3.LMSB3Policy`` and ``KLRewardCallback`` over a
  ``DummyVecEnv`` of single ``TextGen-v1`` envs: a full forward of every padded observation at every step and
  in the update.

An iteration is ``--new-tokens`` steps of every env (one rollout) and its update. The rate is env steps
(= generated tokens) per second over rollouts *and* updates. The sides run alternately ``--repeats``
times, each from a fresh copy of the model; the best run of each is kept. Last line: the ratio.

    python benchmarks/vs_sb3.py --model tiny --threads 1   # one thread: on a busy machine OpenMP stalls
    python benchmarks/vs_sb3.py --model smollm2-135m --n-envs 8 --new-tokens 16 --iterations 2
"""

from __future__ import annotations

import argparse
import copy
import functools
import time
from collections.abc import Callable
from typing import Any

import gymnasium as gym
import torch
from stable_baselines3 import PPO as SB3PPO
from stable_baselines3.common.vec_env import DummyVecEnv

import lm_gym  # noqa: F401  (registers TextGen-v1)
from algorithms.policy import LMActorCriticPolicy
from algorithms.ppo import PPO
from algorithms.sb3 import KLRewardCallback, LMSB3Policy
from lm_gym.models import load_causal_lm


class Stopwatch:
    """Wraps an instance's ``collect_rollouts`` to split a run's time into rollouts and the rest."""

    def __init__(self, obj: Any) -> None:
        self.rollout_s = 0.0
        inner = obj.collect_rollouts

        @functools.wraps(inner)
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.rollout_s += time.perf_counter() - start

        obj.collect_rollouts = timed


def run_ours(model, tokenizer, args: argparse.Namespace, seed: int) -> tuple[float, float]:
    """Seconds of ``learn(iterations)`` (total, rollouts) for lm-gym's PPO."""
    policy = LMActorCriticPolicy(copy.deepcopy(model), tokenizer)
    algo = PPO(
        policy,
        task=args.task,
        n_envs=args.n_envs,
        max_new_tokens=args.new_tokens,
        max_prompt_tokens=args.prompt_tokens,
        n_steps=args.new_tokens,
        n_epochs=args.epochs,
        batch_size=args.batch_seqs,
        learning_rate=args.lr,
        kl_coef=args.kl_coef,
        clip_range=0.2,
        clip_range_vf=0.2,
        vf_coef=0.1,
        gamma=1.0,
        gae_lambda=0.95,
        max_grad_norm=0.5,
        seed=seed,
        verbose=0,
    )
    watch = Stopwatch(algo)
    start = time.perf_counter()
    algo.learn(args.iterations)
    elapsed = time.perf_counter() - start
    algo.close()
    return elapsed, watch.rollout_s


def run_sb3(model, tokenizer, args: argparse.Namespace, seed: int) -> tuple[float, float]:
    """Seconds of ``learn`` over the same number of env steps (total, rollouts) for SB3's PPO."""
    reference = copy.deepcopy(model).requires_grad_(False)  # the env's frozen reference, shared by its envs

    def make_env() -> gym.Env:
        return gym.make(
            "TextGen-v1",
            model=reference,
            tokenizer=tokenizer,
            task=args.task,
            kl_coef=args.kl_coef,
            max_new_tokens=args.new_tokens,
            max_prompt_tokens=args.prompt_tokens,
        )

    env = DummyVecEnv([make_env] * args.n_envs)
    algo = SB3PPO(
        LMSB3Policy,
        env,
        n_steps=args.new_tokens,
        batch_size=min(args.batch_seqs, args.n_envs) * args.new_tokens,  # transitions
        n_epochs=args.epochs,
        learning_rate=args.lr,
        clip_range=0.2,
        clip_range_vf=0.2,
        vf_coef=0.1,
        ent_coef=0.0,
        gamma=1.0,
        gae_lambda=0.95,
        max_grad_norm=0.5,
        seed=seed,
        verbose=0,
        # PPO needs no second derivative: let SDPA use its fused kernels
        policy_kwargs=dict(lm=copy.deepcopy(model), tokenizer=tokenizer, double_backward=False),
    )
    watch = Stopwatch(algo)
    start = time.perf_counter()
    algo.learn(args.iterations * args.new_tokens * args.n_envs, callback=KLRewardCallback())
    elapsed = time.perf_counter() - start
    env.close()
    return elapsed, watch.rollout_s


def best(runs: list[tuple[float, float]]) -> tuple[float, float]:
    return min(runs, key=lambda r: r[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny", help="tiny, smollm2-135m, a folder or a Hub id")
    parser.add_argument("--n-envs", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=16, help="episode length and rollout steps")
    parser.add_argument("--iterations", type=int, default=3, help="rollout + update cycles per run")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-seqs", type=int, default=8, help="sequences per minibatch (ours)")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--kl-coef", type=float, default=0.05)
    parser.add_argument("--task", default="sentiment")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = load_causal_lm(args.model)
    model.requires_grad_(False)
    steps = args.iterations * args.new_tokens * args.n_envs
    print(
        f"model={args.model} n_envs={args.n_envs} new_tokens={args.new_tokens} iterations={args.iterations} "
        f"epochs={args.epochs} prompt_tokens={args.prompt_tokens} threads={torch.get_num_threads()} "
        f"env steps per run={steps}"
    )
    sides: dict[str, Callable] = {"ours": run_ours, "sb3": run_sb3}
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in sides}
    for r in range(args.repeats):  # alternate, so that a noisy neighbour hurts both sides alike
        for name, run in sides.items():
            runs[name].append(run(model, tokenizer, args, seed=r))
    rates = {}
    labels = {"ours": "lm-gym PPO + LMActorCriticPolicy", "sb3": "SB3 PPO + LMSB3Policy"}
    for name, label in labels.items():
        total, rollout = best(runs[name])
        rates[name] = steps / total
        print(
            f"  {name:4s} {'(' + label + ')':34s}: {rates[name]:8.1f} samples/s  total {total:7.2f} s  "
            f"(rollouts {rollout:6.2f} s, updates {total - rollout:6.2f} s)  "
            f"runs {[round(t, 2) for t, _ in runs[name]]}"
        )
    print(f"ratio ours/sb3: {rates['ours'] / rates['sb3']:.2f}")


if __name__ == "__main__":
    main()
