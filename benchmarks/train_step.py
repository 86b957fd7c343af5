"""Training-phase throughput: our PPO update against a plain `transformers` training step, same batch.

One rollout fills the buffer; then, alternating, side by side:

* ours: ``PPO.train()`` with one epoch and one minibatch holding every sequence (teacher-forced forward
  of the policy with the value head, PPO loss, backward, clip, AdamW step);
* baseline: ``model(input_ids, attention_mask, labels=input_ids)`` on the same left-padded sequences,
  ``loss.backward()``, AdamW step: the least any trainer must do per batch.

Tokens/s counts the tokens of the sequences (prompt + completion). Last line: the ratio (goal >= 0.9).

    python benchmarks/train_step.py --model tiny
    python benchmarks/train_step.py --model smollm2-135m --batch 16 --new-tokens 48
"""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch

from algorithms.policy import LMActorCriticPolicy
from algorithms.ppo import PPO
from lm_gym.models import load_causal_lm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    model, tokenizer = load_causal_lm(args.model)
    baseline_model = copy.deepcopy(model).train(False)
    policy = LMActorCriticPolicy(model, tokenizer)
    algo = PPO(
        policy,
        n_envs=args.batch,
        max_new_tokens=args.new_tokens,
        n_epochs=1,
        batch_size=args.batch,
        verbose=0,
        stop_token_ids=[],
    )
    algo.collect_rollouts()
    batch = next(
        algo.buffer.minibatches(args.batch, np.random.default_rng(0), policy.device, tokenizer.pad_token_id)
    )
    tokens = int(batch.attention_mask.sum())
    optimizer = torch.optim.AdamW(baseline_model.parameters(), lr=1e-5)
    saved = copy.deepcopy(algo.buffer.advantages)

    def ours() -> float:
        algo.buffer.advantages = saved.copy()
        start = time.perf_counter()
        algo.train()
        return time.perf_counter() - start

    def plain() -> float:
        start = time.perf_counter()
        labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
        loss = baseline_model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels
        ).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return time.perf_counter() - start

    ours(), plain()  # warm-up (allocator, optimizer state)
    t_ours, t_plain = [], []
    for _ in range(args.repeats):
        t_ours.append(ours())
        t_plain.append(plain())
    algo.close()
    ours_tps, plain_tps = tokens / min(t_ours), tokens / min(t_plain)
    print(
        f"model={args.model} sequences={batch.input_ids.shape[0]} tokens={tokens} threads={torch.get_num_threads()}"
    )
    print(
        f"ours     (PPO.train, 1 epoch, 1 minibatch): {ours_tps:9.1f} tokens/s  runs {np.round(t_ours, 3).tolist()} s"
    )
    print(
        f"baseline (forward + backward + AdamW)     : {plain_tps:9.1f} tokens/s  runs {np.round(t_plain, 3).tolist()} s"
    )
    print(f"ratio ours/baseline: {ours_tps / plain_tps:.2f}")


if __name__ == "__main__":
    main()
