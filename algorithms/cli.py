"""The ``lm-gym`` command. Thin: parses arguments, then calls library code."""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from lm_gym.env import DEFAULT_MODEL, TextGenVectorEnv
from lm_gym.models import load_causal_lm
from lm_gym.sampling import CachedSampler
from lm_gym.tasks import TASKS


def rollout(args: argparse.Namespace) -> None:
    """Sample one continuation per env with a policy and print score, KL and text for each."""
    torch.manual_seed(args.seed)
    reference, tokenizer = load_causal_lm(args.model)
    reference.requires_grad_(False)
    # Without --policy the policy *is* the initial model (the first rollout of RL fine-tuning).
    policy = reference if args.policy is None else load_causal_lm(args.policy)[0]
    envs = TextGenVectorEnv(
        args.num_envs,
        model=reference,
        tokenizer=tokenizer,
        task=args.task,
        split=args.split,
        kl_coef=args.kl_coef,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
    )
    sampler = CachedSampler(
        policy,
        args.num_envs,
        envs.pad_token_id,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        generator=torch.Generator(device=policy.device).manual_seed(args.seed),
    )
    start = time.perf_counter()
    obs, infos = envs.reset(seed=args.seed)
    n = args.num_envs
    done, kl_sum, returns, scores, texts = np.zeros(n, bool), np.zeros(n), np.zeros(n), np.zeros(n), [""] * n
    tokens = 0
    while not done.all():  # rows that finished restart (next-step autoreset) and are ignored from then on
        actions, log_probs = sampler.act(obs)
        envs.set_policy_log_probs(log_probs)
        obs, rewards, terminated, truncated, step_infos = envs.step(actions)
        running = ~done
        tokens += int(running.sum())
        returns[running] += rewards[running]
        kl_sum[running] += step_infos["kl"][running]
        ended = running & (terminated | truncated)
        for i in np.flatnonzero(ended):
            scores[i], texts[i] = step_infos["score"][i], step_infos["text"][i]
        done |= ended
    elapsed = time.perf_counter() - start
    envs.close()
    for i in range(n):
        prompt = infos["prompt"][i]
        print(f"[{i:2d}] score {scores[i]:+.3f}  KL {kl_sum[i]:6.2f}  | {prompt} >>> {texts[i]!r}")
    print(
        f"mean score {scores.mean():+.3f}  mean KL {kl_sum.mean():.3f} nats  mean return {returns.mean():+.3f}  "
        f"{tokens / elapsed:.1f} tokens/s ({n} envs, {elapsed:.1f} s)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lm-gym", description="RL fine-tuning of language models on TextGen-v0"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("rollout", help="sample continuations on TextGen-v0 and show score, KL and text")
    p.add_argument(
        "--model", default=DEFAULT_MODEL, help="reference model: tiny, smollm2-135m, a folder or Hub id"
    )
    p.add_argument("--policy", default=None, help="policy to sample with (a folder); default: the reference")
    p.add_argument("--task", default="sentiment", choices=sorted(TASKS), help="prompt set and reward")
    p.add_argument("--split", default="eval", choices=["train", "eval"], help="which prompts")
    p.add_argument("--num-envs", type=int, default=8, help="texts sampled side by side")
    p.add_argument("--max-new-tokens", type=int, default=32, help="episode length limit")
    p.add_argument("--kl-coef", type=float, default=0.05, help="beta of the per-token KL penalty")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (env uses the same)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0 = off)")
    p.add_argument("--seed", type=int, default=0, help="seeds prompts and sampling")
    p.set_defaults(func=rollout)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as err:
        sys.exit(f"lm-gym {args.command}: error: {err}")


if __name__ == "__main__":
    main()
