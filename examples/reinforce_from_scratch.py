"""REINFORCE with a KL penalty, from scratch: RLHF in one file of Gymnasium + PyTorch.

Shows the whole of policy-gradient fine-tuning of a language model, with nothing from ``algorithms``: the
LM *is* the policy (its softmax over the vocabulary is pi(a|s)), the env rewards a finished text with a
sentiment score, every token is charged a KL penalty for drifting from the frozen initial model, and one
gradient step per batch of episodes pushes up the log-probability of texts that beat the batch average.

The KL penalty of a token is ``-beta * (log pi(a_t|s_t) - log pi_ref(a_t|s_t))``. The env runs pi_ref and pays
its half, ``beta * log pi_ref(a_t|s_t)``, in the reward; the other half is ours, the agent's: we add
``-beta * log pi(a_t|s_t)`` of each sampled token ourselves.

Run:
    python examples/reinforce_from_scratch.py                       # SmolLM2-135M (full fine-tuning)
    python examples/reinforce_from_scratch.py --model tiny --task letters --iterations 2 --max-new-tokens 8
"""

import argparse
import copy

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import AutoresetMode

import lm_gym  # noqa: F401  (registers TextGen-v1)
from lm_gym.models import load_causal_lm
from lm_gym.sampling import CachedSampler

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default="smollm2-135m", help="tiny, smollm2-135m, a folder or a Hub id")
parser.add_argument(
    "--task", default="sentiment", help="sentiment; letters for tiny, whose random bytes VADER scores 0"
)
parser.add_argument("--iterations", type=int, default=20, help="policy-gradient steps (one per batch)")
parser.add_argument("--num-envs", type=int, default=8, help="episodes per batch")
parser.add_argument("--max-new-tokens", type=int, default=24)
parser.add_argument("--kl-coef", type=float, default=0.05, help="beta: price of one nat of KL")
parser.add_argument("--lr", type=float, default=1e-5)
args = parser.parse_args()
n = args.num_envs
torch.manual_seed(0)

policy, tokenizer = load_causal_lm(args.model)  # pi_theta: the LM we train (dropout off: eval mode)
reference = copy.deepcopy(policy).requires_grad_(False)  # pi_ref: a frozen copy, never trained
# One batched env: N episodes side by side. The env runs pi_ref itself to price each token's KL.
envs = gym.make_vec(
    "TextGen-v1",
    num_envs=n,
    model=reference,
    tokenizer=tokenizer,
    task=args.task,
    max_new_tokens=args.max_new_tokens,
    kl_coef=args.kl_coef,
    autoreset_mode=AutoresetMode.NEXT_STEP,  # a row's last step returns its own observation and score
)
optimizer = torch.optim.Adam(policy.parameters(), lr=args.lr)

for it in range(args.iterations):
    # ---- 1. Roll out one episode per env with the current policy (no gradients needed yet).
    # The sampler runs the LM on each row's text, takes softmax(logits) = pi(.|s_t), draws a_t ~ pi(.|s_t)
    # and returns log pi(a_t|s_t). Its KV cache means each step runs only the newest token (fast on CPU).
    sampler = CachedSampler(policy, n, envs.pad_token_id)
    obs, _ = envs.reset(seed=it * n)
    done, n_actions = np.zeros(n, bool), np.zeros(n, int)  # per row: episode over? tokens generated
    returns, kl, scores = np.zeros(n), np.zeros(n), np.zeros(n)
    final_obs = [None] * n  # each episode's last observation: prompt + completion, -1 as padding
    while not done.all():
        actions, log_pi = sampler.act(obs)  # (N,) token ids and their log-probs, no gradients
        # The env's reward: beta * log pi_ref(a_t|s_t) (+ the score at the end).
        obs, rewards, terminated, truncated, infos = envs.step(actions)
        # Our half of the KL penalty: -beta * log pi(a_t|s_t). Together: r_t = -beta * KL_t (+ score).
        log_pi = log_pi.double().numpy()
        rewards = rewards - args.kl_coef * log_pi
        # One episode per row: once a row's episode ends, the env restarts it (autoreset) and we ignore it.
        running = ~done
        returns[running] += rewards[running]  # return G = score - beta * sum_t KL_t (gamma = 1)
        kl[running] += (log_pi - infos["ref_log_prob"])[running]  # KL_t = log pi - log pi_ref
        n_actions[running] += 1
        for i in np.flatnonzero(running & (terminated | truncated)):
            scores[i] = infos["score"][i]  # the reward model's score, given at the last step
            final_obs[i] = obs[i]
            done[i] = True

    # ---- 2. REINFORCE: grad J = E[(G - b) * grad sum_t log pi(a_t|s_t)].
    # The observation's -1 padding -> input_ids (padding read as the pad id) and attention_mask.
    batch = lm_gym.hf_inputs(torch.as_tensor(np.stack(final_obs)), tokenizer.pad_token_id)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    # Recompute every chosen token's log-prob with gradients, in one teacher-forced pass over the texts:
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: each row counts from its first token
    logits = policy(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    log_probs = torch.log_softmax(logits[:, :-1], dim=-1)  # the logits at position j predict token j+1
    token_log_pi = log_probs.gather(2, ids[:, 1:, None])[..., 0]  # (N, L-1)
    # The actions are each row's last n_actions tokens (the text sits at the right end of the observation).
    cols = torch.arange(ids.shape[1] - 1)
    is_action = cols[None, :] >= (ids.shape[1] - 1 - torch.as_tensor(n_actions))[:, None]
    sum_log_pi = (token_log_pi * is_action).sum(-1)  # log-prob of the whole completion
    baseline = returns.mean()  # b: subtracting the batch's mean return lowers the gradient's variance
    advantage = torch.as_tensor(returns - baseline, dtype=torch.float32)  # better or worse than average?
    loss = -(advantage * sum_log_pi).mean()  # minimising this ascends the expected return
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
    optimizer.step()
    print(
        f"iter {it}: mean score {scores.mean():+.3f}  mean KL {kl.mean():.3f} nats  "
        f"mean return {returns.mean():+.3f}  loss {loss.item():+.3f}"
    )
envs.close()
