"""Three ways for an agent to pay its half of TextGen-v1's KL penalty, trained side by side.

``TextGen-v1`` pays in the reward only the reference's half of the per-token KL penalty,
``r_t = beta * log pi_ref(a_t|s_t)`` (plus the task's score at the last step). The agent's half,
``-beta * log pi(a_t|s_t)``, is the agent's to pay. This script trains the same policy with the same
REINFORCE-with-baseline loop, the same seeds and the same env under three routes (the policy starts from
the reference; a seed sets the prompts and the sampling):

* ``exact``: add ``-beta * log pi(a_t|s_t)`` of each sampled token to the reward. The return is then
  ``score - beta * sum_t (log pi - log pi_ref)``, the k1 KL-penalised RLHF reward (Ziegler et al. 2019,
  "Fine-Tuning Language Models from Human Preferences"), whose expectation is
  ``E[score] - beta * KL(pi || pi_ref)``. lm-gym's algorithms do this.
* ``entropy``: add nothing to the reward; put an entropy bonus ``beta * sum_t H(pi(.|s_t))`` in the loss
  (``ent_coef = beta`` in any RL library). The same objective in expectation, but the bonus's gradient
  ignores how an action changes the states after it, and so the entropy bonuses earned there (or, when
  the action is a stop token, forgone).
* ``none``: add nothing. The agent then maximises ``E[score] + beta * E[sum_t log pi_ref(a_t|s_t)]``
  = ``E[score] - beta * sum_t CE(pi_t, ref_t)`` = ``E[score] - beta * KL - beta * sum_t H(pi_t)``: a KL
  penalty *plus an entropy penalty*, which pulls the policy toward the reference's most likely tokens;
  and since every token costs ``beta * CE >= 0``, a length penalty when a stop token can end the text.

After training, each policy is evaluated on held-out prompt draws (``--eval-batches`` batches): the task's
score, the KL per text to the reference (``sum_t log pi - log pi_ref`` of the sampled tokens, from the
sampler's log-probs and the env's ``info["ref_log_prob"]``; a Monte Carlo estimate of the sequence-level
KL), the policy's mean per-token entropy, the mean number of tokens per text (below
``--max-new-tokens`` when the policy stops early with EOS; ``--no-stop`` fixes the length), and the
KL-regularised objective ``score - beta * KL`` that the exact route maximises. The table gives the mean
and standard deviation over seeds; the "reference" row is the untrained model. Last line: the score and
KL of each route.

    python benchmarks/kl_routes.py              # tiny, letters, beta 0.1, 5 seeds (~3 min on 2 cores)
    python benchmarks/kl_routes.py --no-stop    # texts of fixed length: no early-stop exploit
    python benchmarks/kl_routes.py --kl-coef 0.05 --seeds 2 --iterations 20
"""

from __future__ import annotations

import argparse
import copy
import time
from typing import NamedTuple

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import AutoresetMode
from transformers import PreTrainedModel

import lm_gym
from lm_gym.models import load_causal_lm
from lm_gym.sampling import CachedSampler

ROUTES = ("exact", "entropy", "none")
METRICS = ("score", "kl", "entropy", "length", "objective")
HEADERS = {
    "score": "score",
    "kl": "KL/text (nats)",
    "entropy": "entropy/token",
    "length": "tokens/text",
    "objective": "score - beta*KL",
}


class Rollout(NamedTuple):
    """One episode per env, sampled by the current policy."""

    final_obs: np.ndarray  # (N, L) prompt + completion, left-padded with -1
    n_actions: np.ndarray  # (N,) tokens generated
    scores: np.ndarray  # (N,) the task's score of each text
    sum_log_pi: np.ndarray  # (N,) sum_t log pi(a_t|s_t), from the sampler
    sum_log_ref: np.ndarray  # (N,) sum_t log pi_ref(a_t|s_t), from info["ref_log_prob"]
    env_returns: np.ndarray  # (N,) sum_t r_t = score + beta * sum_t log pi_ref(a_t|s_t)


class CompletionLogProbs(NamedTuple):
    """A teacher-forced pass over a rollout's texts, with gradients."""

    log_pi: torch.Tensor  # (N, L-1) log pi of each next token; only the action columns count
    entropy: torch.Tensor  # (N, L-1) H(pi(.|s)) before each next token
    is_action: torch.Tensor  # (N, L-1) bool, the columns of the generated tokens


def rollout(
    policy: PreTrainedModel, envs: gym.vector.VectorEnv, seed: int, generator: torch.Generator
) -> Rollout:
    """Sample one episode in each of the ``envs`` (prompts drawn with ``seed``) with ``policy``."""
    n = envs.num_envs
    sampler = CachedSampler(policy, n, envs.pad_token_id, generator=generator)
    obs, _ = envs.reset(seed=seed)
    done, n_actions = np.zeros(n, bool), np.zeros(n, int)
    scores, sum_log_pi, sum_log_ref, env_returns = np.zeros(n), np.zeros(n), np.zeros(n), np.zeros(n)
    final_obs = np.zeros((n, *envs.single_observation_space.shape), np.int64)  # (N, L)
    while not done.all():
        actions, log_pi = sampler.act(obs)  # (N,), (N,)
        obs, rewards, terminated, truncated, infos = envs.step(actions)
        # Rows whose episode is over are restarted by the env (autoreset); they are ignored until the end.
        running = ~done
        env_returns[running] += rewards[running]
        sum_log_pi[running] += log_pi.double().numpy()[running]
        sum_log_ref[running] += infos["ref_log_prob"][running]
        n_actions[running] += 1
        ended = running & (terminated | truncated)
        scores[ended] = infos["score"][ended]
        final_obs[ended] = obs[ended]
        done |= ended
    return Rollout(final_obs, n_actions, scores, sum_log_pi, sum_log_ref, env_returns)


def completion_log_probs(policy: PreTrainedModel, batch: Rollout, pad_token_id: int) -> CompletionLogProbs:
    """log pi and the entropy of pi at every generated token of ``batch``, in one teacher-forced pass."""
    inputs = lm_gym.hf_inputs(torch.as_tensor(batch.final_obs), pad_token_id)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]  # (N, L)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: each row counts from its first token
    logits = policy(input_ids=ids, attention_mask=mask, position_ids=positions).logits  # (N, L, V)
    log_probs = torch.log_softmax(logits[:, :-1], dim=-1)  # (N, L-1, V): column j predicts token j+1
    log_pi = log_probs.gather(2, ids[:, 1:, None])[..., 0]  # (N, L-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)  # (N, L-1)
    # The completion is each row's last n_actions tokens (the text sits at the right end).
    cols = torch.arange(ids.shape[1] - 1)  # (L-1,)
    is_action = cols[None, :] >= (ids.shape[1] - 1 - torch.as_tensor(batch.n_actions))[:, None]  # (N, L-1)
    return CompletionLogProbs(log_pi, entropy, is_action)


def train(
    route: str, seed: int, initial: PreTrainedModel, envs: gym.vector.VectorEnv, args: argparse.Namespace
) -> PreTrainedModel:
    """REINFORCE with a batch-mean baseline, paying the agent's half of the KL by ``route``."""
    policy = copy.deepcopy(initial).requires_grad_(True)
    optimizer = torch.optim.Adam(policy.parameters(), lr=args.lr)
    generator = torch.Generator().manual_seed(seed)  # the same draws for every route at iteration 0
    beta, n = args.kl_coef, envs.num_envs
    for it in range(args.iterations):
        with torch.no_grad():
            batch = rollout(policy, envs, seed * 10**6 + it * n, generator)
        returns = batch.env_returns  # (N,) score + beta * sum_t log pi_ref
        if route == "exact":
            returns = returns - beta * batch.sum_log_pi  # score - beta * sum_t (log pi - log pi_ref)
        advantages = torch.as_tensor(returns - returns.mean(), dtype=torch.float32)  # (N,)

        fwd = completion_log_probs(policy, batch, envs.pad_token_id)
        sum_log_pi = (fwd.log_pi * fwd.is_action).sum(-1)  # (N,) log pi(completion)
        # grad J = E[(G - b) * grad log pi(completion)] (Williams 1992)
        policy_loss = -(advantages * sum_log_pi).mean()
        entropy_bonus = (fwd.entropy * fwd.is_action).sum(-1).mean()  # summed per text, as the KL is
        loss = policy_loss - beta * entropy_bonus if route == "entropy" else policy_loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()
    return policy


@torch.no_grad()
def evaluate(
    policy: PreTrainedModel, envs: gym.vector.VectorEnv, seed: int, args: argparse.Namespace
) -> dict[str, float]:
    """The metrics of ``policy`` over ``--eval-batches`` rollouts on prompt draws no training run saw."""
    generator = torch.Generator().manual_seed(10**9 + seed)
    scores, kls, entropies, lengths = [], [], [], []
    for b in range(args.eval_batches):
        batch = rollout(policy, envs, 10**9 + seed * 10**3 + b, generator)
        fwd = completion_log_probs(policy, batch, envs.pad_token_id)
        scores.append(batch.scores)
        kls.append(batch.sum_log_pi - batch.sum_log_ref)  # k1 per text: sum_t log pi - log pi_ref
        entropies.append((fwd.entropy * fwd.is_action).sum(-1).numpy())
        lengths.append(batch.n_actions)
    score, kl = np.concatenate(scores).mean(), np.concatenate(kls).mean()
    length = np.concatenate(lengths)  # (eval texts,)
    entropy = np.concatenate(entropies).sum() / length.sum()  # mean over all generated tokens
    return {
        "score": score,
        "kl": kl,
        "entropy": entropy,
        "length": length.mean(),
        "objective": score - args.kl_coef * kl,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny, smollm2-135m, a folder or a Hub id")
    parser.add_argument("--task", default="letters", help="letters (tiny learns it), sentiment, ...")
    parser.add_argument("--seeds", type=int, default=5, help="runs per route, seeds 0..seeds-1")
    parser.add_argument("--iterations", type=int, default=60, help="policy-gradient steps per run")
    parser.add_argument("--num-envs", type=int, default=16, help="episodes per batch")
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--kl-coef", type=float, default=0.1, help="beta: price of one nat of KL")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam, full fine-tuning")
    parser.add_argument(
        "--eval-batches", type=int, default=4, help="batches of --num-envs texts per evaluation"
    )
    parser.add_argument(
        "--no-stop", action="store_true", help="no stop token: every text has --max-new-tokens tokens"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny gains nothing from more)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    initial, tokenizer = load_causal_lm(args.model)  # pi_ref, and every route's starting policy
    reference = copy.deepcopy(initial).requires_grad_(False)
    envs = gym.make_vec(
        "TextGen-v1",
        num_envs=args.num_envs,
        model=reference,
        tokenizer=tokenizer,
        task=args.task,
        max_new_tokens=args.max_new_tokens,
        kl_coef=args.kl_coef,
        stop_token_ids=[] if args.no_stop else None,  # None: the tokenizer's EOS ends a text
        autoreset_mode=AutoresetMode.NEXT_STEP,  # a row's last step returns its own observation and score
    )
    stop = "no stop token" if args.no_stop else "EOS stops a text"
    print(
        f"model {args.model}, task {args.task}, beta {args.kl_coef}, lr {args.lr}, {args.seeds} seeds; "
        f"{args.iterations} iterations of {args.num_envs} texts of <= {args.max_new_tokens} tokens ({stop}); "
        f"evaluation on {args.eval_batches * args.num_envs} texts"
    )
    results: dict[str, list[dict[str, float]]] = {name: [] for name in ("reference", *ROUTES)}
    for seed in range(args.seeds):
        results["reference"].append(evaluate(initial, envs, seed, args))
        for route in ROUTES:
            run_start = time.perf_counter()
            metrics = evaluate(train(route, seed, initial, envs, args), envs, seed, args)
            results[route].append(metrics)
            print(
                f"seed {seed} {route:8s} "
                + "  ".join(f"{key} {metrics[key]:+.3f}" for key in METRICS)
                + f"  ({time.perf_counter() - run_start:.0f} s)",
                flush=True,
            )
    envs.close()

    def stats(name: str, key: str) -> str:
        values = np.array([m[key] for m in results[name]])
        return f"{values.mean():+.3f} ± {values.std(ddof=1) if len(values) > 1 else 0.0:.3f}"

    print(f"\nmean ± sd over {args.seeds} seeds (sd with ddof=1)")
    print(f"{'route':10s}" + "".join(f"{HEADERS[key]:>20s}" for key in METRICS))
    for name in results:
        print(f"{name:10s}" + "".join(f"{stats(name, key):>20s}" for key in METRICS))
    print(f"elapsed {time.perf_counter() - start:.0f} s")
    print(
        f"beta {args.kl_coef}: "
        + "; ".join(f"{route} score {stats(route, 'score')} KL {stats(route, 'kl')}" for route in ROUTES)
    )


if __name__ == "__main__":
    main()
