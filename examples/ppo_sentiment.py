"""PPO on the sentiment task with lm-gym's own algorithm: make a language model write positive reviews.

Shows the actor-critic for LMs (``algorithms.policy.LMActorCriticPolicy``: the LM is the actor, a value
head on its last hidden state is the critic) trained by ``algorithms.ppo.PPO`` on TextGen-v1. The task
continues movie-review openings; the reward model (VADER) scores the sentiment of each continuation, and a
per-token KL penalty keeps the policy near the initial model. We measure the mean score on held-out
prompts before and after training.

Run:
    python examples/ppo_sentiment.py                      # SmolLM2-135M with LoRA (slow on CPU)
    python examples/ppo_sentiment.py --model tiny --task letters --iterations 2 --n-envs 2 --max-new-tokens 8
Metrics go to the console and to ``--run-dir`` (TensorBoard, metrics.jsonl, checkpoints, final model).
"""

import argparse

import numpy as np
import torch
from gymnasium.vector import AutoresetMode

from algorithms.policy import LMActorCriticPolicy
from algorithms.ppo import PPO
from lm_gym import TextGenVectorEnv, hf_inputs
from lm_gym.models import load_causal_lm

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default="smollm2-135m", help="tiny, smollm2-135m, a folder or a Hub id")
parser.add_argument(
    "--task", default="sentiment", help="sentiment; letters for tiny, whose random bytes VADER scores 0"
)
parser.add_argument("--iterations", type=int, default=10, help="PPO iterations (rollout + update)")
parser.add_argument("--n-envs", type=int, default=8, help="texts per rollout")
parser.add_argument("--max-new-tokens", type=int, default=24)
parser.add_argument("--lora-r", type=int, default=16, help="LoRA rank (0 = train every weight)")
parser.add_argument("--learning-rate", type=float, default=1e-4)
parser.add_argument("--run-dir", default="runs/ppo_sentiment")
args = parser.parse_args()


def mean_eval_score(policy: LMActorCriticPolicy, seed: int = 1234) -> float:
    """Mean reward-model score of one sampled completion per env, on the *eval* prompts (never trained on)."""
    envs = TextGenVectorEnv(
        args.n_envs,
        model=policy.model,
        tokenizer=policy.tokenizer,
        task=args.task,
        split="eval",
        kl_coef=0.0,
        max_new_tokens=args.max_new_tokens,
        autoreset_mode=AutoresetMode.NEXT_STEP,  # a row's last step returns its own score
    )  # score only: no KL term
    agent = policy.rollout_agent(args.n_envs, torch.Generator(device=policy.device).manual_seed(seed))
    obs, _ = envs.reset(seed=seed)
    done, scores = np.zeros(args.n_envs, bool), np.zeros(args.n_envs)
    while not done.all():
        # the actor samples (the log-probs and values are for training); it reads ids and attention mask
        actions, _, _ = agent.act(hf_inputs(obs, tokenizer.pad_token_id))
        obs, _, terminated, truncated, infos = envs.step(actions)
        ended = ~done & (terminated | truncated)  # first episode of each env; later ones are ignored
        scores[ended], done = infos["score"][ended], done | ended
    envs.close()
    return float(scores.mean())


torch.manual_seed(0)
model, tokenizer = load_causal_lm(args.model)
# Actor-critic around the LM. With LoRA only small adapter matrices train, and the frozen reference of the
# KL penalty is the same network with the adapters switched off (no second copy of the weights).
policy = LMActorCriticPolicy(model, tokenizer, lora_r=args.lora_r)
before = mean_eval_score(policy)

# PPO builds its own TextGen-v1 vector env (n_envs rows); each iteration collects n_steps = max_new_tokens
# tokens per row, computes GAE advantages from the rewards (score at the end, -beta * KL every token) and
# the critic's values, then runs a few epochs of clipped-ratio updates on that batch.
ppo = PPO(
    policy,
    task=args.task,
    n_envs=args.n_envs,
    max_new_tokens=args.max_new_tokens,
    learning_rate=args.learning_rate,
    kl_coef=0.05,
    run_dir=args.run_dir,
    seed=0,
)
ppo.learn(args.iterations)  # prints a table of rollout/ and train/ metrics per iteration
ppo.close()

after = mean_eval_score(policy)
print(f"mean eval score before {before:+.3f}  after {after:+.3f}  ({args.iterations} iterations)")
print(f"fine-tuned model: {args.run_dir}/final (AutoModelForCausalLM.from_pretrained loads it)")
