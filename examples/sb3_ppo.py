"""Unmodified stable-baselines3 PPO fine-tuning a language model on TextGen-v0.

Shows that RLHF fits a stock RL library: ``stable_baselines3.PPO`` runs its usual loop (collect
``n_steps`` per env, GAE, clipped-ratio epochs); the only LM-specific piece is the policy class,
``algorithms.sb3.LMSB3Policy`` (the LM is the actor, a value head the critic). SB3 owns the loop, so the
policy cannot tell the env its log-probs before each step: a shared ``PolicyLogProbCache`` carries them
(the policy records each batch of next-token distributions, the env looks its observation up) so the
reward includes the KL penalty. A callback prints the reward model's score of the texts finished per rollout.

Run:
    python examples/sb3_ppo.py                    # SmolLM2-135M; slow: SB3 runs a full forward per token
    python examples/sb3_ppo.py --model tiny --steps 16 --n-steps 8 --max-new-tokens 8
"""

import argparse

import numpy as np
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env

import lm_gym  # noqa: F401  (registers TextGen-v0)
from algorithms.sb3 import LMSB3Policy
from lm_gym import PolicyLogProbCache
from lm_gym.models import load_causal_lm

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default="smollm2-135m", help="tiny, smollm2-135m, a folder or a Hub id")
parser.add_argument("--steps", type=int, default=768, help="total tokens generated (SB3 total_timesteps)")
parser.add_argument("--n-envs", type=int, default=2)
parser.add_argument("--n-steps", type=int, default=96, help="tokens per env per rollout")
parser.add_argument("--max-new-tokens", type=int, default=24)
args = parser.parse_args()


class ScorePrinter(BaseCallback):
    """Per rollout: the mean score of finished texts (info["score"], on an episode's last step) and the
    mean per-token KL (info["kl"], present when the env found log pi in the cache; k1, so one rollout's mean
    can be below 0)."""

    def _on_rollout_start(self) -> None:
        self.scores, self.kls = [], []

    def _on_step(self) -> bool:
        self.scores += [info["score"] for info in self.locals["infos"] if "score" in info]
        self.kls += [info["kl"] for info in self.locals["infos"] if "kl" in info]
        return True  # False would stop training

    def _on_rollout_end(self) -> None:
        score = f"{np.mean(self.scores):+.3f}" if self.scores else "n/a"
        kl = f"{np.mean(self.kls):+.4f}" if self.kls else "n/a (no log-probs reached the env)"
        print(
            f"timesteps {self.num_timesteps}: {len(self.scores)} texts finished, mean score {score}, "
            f"KL per token {kl}"
        )


reference, tokenizer = load_causal_lm(args.model)  # the env's frozen reference (pi_ref) for the KL penalty
reference.requires_grad_(False)
cache = PolicyLogProbCache()  # shared by the policy (writes log pi) and the envs (read log pi(action))
# n_envs ordinary single TextGen-v0 envs in SB3's DummyVecEnv (with SB3's Monitor wrapper). make_vec_env
# asks for render_mode="rgb_array" unless told otherwise; a text env renders text ("ansi").
env = make_vec_env(
    "TextGen-v0",
    n_envs=args.n_envs,
    seed=0,
    env_kwargs=dict(
        model=reference,
        tokenizer=tokenizer,
        max_new_tokens=args.max_new_tokens,
        log_prob_cache=cache,
        render_mode="ansi",
    ),
)
agent = PPO(
    LMSB3Policy,
    env,
    # lm by name: the policy loads its own trainable copy (the same initial weights as the reference)
    policy_kwargs=dict(lm=args.model, tokenizer=tokenizer, log_prob_cache=cache),
    n_steps=args.n_steps,  # rollout length per env; episodes end by EOS or max_new_tokens inside it
    batch_size=max(1, args.n_steps * args.n_envs // 4),  # minibatch of (state, action) pairs
    n_epochs=2,
    learning_rate=1e-5,  # small: every weight of a pretrained LM is trained
    gamma=1.0,  # no discount: the score arrives at the end of the text, nothing should shrink it
    # The text ends *terminated* at EOS or max_new_tokens (it is scored there): SB3 bootstraps nothing past it.
    verbose=1,
    seed=0,
)
agent.learn(total_timesteps=args.steps, callback=ScorePrinter())
env.close()
