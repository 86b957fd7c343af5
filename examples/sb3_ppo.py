"""Unmodified stable-baselines3 PPO fine-tuning a language model on TextGen-v1.

Shows that RLHF fits a stock RL library: ``stable_baselines3.PPO`` runs its usual loop (collect
``n_steps`` per env, GAE, clipped-ratio epochs); the LM-specific pieces are the policy class,
``algorithms.sb3.LMSB3Policy`` (the LM is the actor, a value head the critic), and one callback for the KL
penalty. The env pays the reference's half of it, ``kl_coef * log pi_ref(a_t|s_t)``, in every step's reward;
the agent's half, ``-kl_coef * log pi(a_t|s_t)``, is the agent's: ``algorithms.sb3.KLRewardCallback`` adds it
to the rewards SB3 stores, from the log-probs SB3 sampled with, so PPO optimises ``score - kl_coef * (log pi -
log pi_ref)`` per token exactly. (``PPO(..., ent_coef=kl_coef)`` instead, SB3's entropy bonus, has the same
objective's value but leaves the entropy out of the return: with EOS the policy then learns to stop at once;
``docs/environment.md``.) A second callback prints, per rollout, the reward model's mean score of the
finished texts and the mean per-token KL.

Run:
    python examples/sb3_ppo.py                    # SmolLM2-135M; slow: SB3 runs a full forward per token
    python examples/sb3_ppo.py --model tiny --task letters --steps 16 --n-steps 8 --max-new-tokens 8
"""

import argparse

import numpy as np
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env

import lm_gym  # noqa: F401  (registers TextGen-v1)
from algorithms.sb3 import KLRewardCallback, LMSB3Policy
from lm_gym.models import load_causal_lm

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default="smollm2-135m", help="tiny, smollm2-135m, a folder or a Hub id")
parser.add_argument(
    "--task", default="sentiment", help="sentiment; letters for tiny, whose random bytes VADER scores 0"
)
parser.add_argument("--steps", type=int, default=768, help="total tokens generated (SB3 total_timesteps)")
parser.add_argument("--n-envs", type=int, default=2)
parser.add_argument("--n-steps", type=int, default=96, help="tokens per env per rollout")
parser.add_argument("--max-new-tokens", type=int, default=24)
args = parser.parse_args()


class ScorePrinter(BaseCallback):
    """Per rollout: the mean score of finished texts (info["score"] on an episode's last step) and the mean
    per-token KL, log pi (the log-prob SB3 sampled with) - log pi_ref (info["ref_log_prob"]); k1, so one
    rollout's mean can be below 0."""

    def _on_rollout_start(self) -> None:
        self.scores, self.kls = [], []

    def _on_step(self) -> bool:
        infos, dones = self.locals["infos"], self.locals["dones"]
        log_pi = self.locals["log_probs"].cpu().numpy()  # (n_envs,)
        self.scores += [info["score"] for info, done in zip(infos, dones) if done]
        self.kls += [float(lp) - info["ref_log_prob"] for lp, info in zip(log_pi, infos)]
        return True  # False would stop training

    def _on_rollout_end(self) -> None:
        score = f"{np.mean(self.scores):+.3f}" if self.scores else "n/a"
        print(
            f"timesteps {self.num_timesteps}: {len(self.scores)} texts finished, mean score {score}, "
            f"KL per token {np.mean(self.kls):+.4f}"
        )


reference, tokenizer = load_causal_lm(args.model)  # the env's frozen reference (pi_ref) for the KL penalty
reference.requires_grad_(False)
# n_envs ordinary single TextGen-v1 envs in SB3's DummyVecEnv (with SB3's Monitor wrapper). make_vec_env
# asks for render_mode="rgb_array" unless told otherwise; a text env renders text ("ansi").
env = make_vec_env(
    "TextGen-v1",
    n_envs=args.n_envs,
    seed=0,
    env_kwargs=dict(
        model=reference,
        tokenizer=tokenizer,
        task=args.task,
        max_new_tokens=args.max_new_tokens,
        render_mode="ansi",
    ),
)
agent = PPO(
    LMSB3Policy,
    env,
    # lm by name: the policy loads its own trainable copy (the same initial weights as the reference)
    policy_kwargs=dict(lm=args.model, tokenizer=tokenizer),
    n_steps=args.n_steps,  # rollout length per env; episodes end by EOS or max_new_tokens inside it
    batch_size=max(1, args.n_steps * args.n_envs // 4),  # minibatch of (state, action) pairs
    n_epochs=2,
    learning_rate=1e-5,  # small: every weight of a pretrained LM is trained
    gamma=1.0,  # no discount: the score arrives at the end of the text, nothing should shrink it
    # The text ends *terminated* at EOS or max_new_tokens (it is scored there): SB3 bootstraps nothing
    # past it.
    verbose=1,
    seed=0,
)
# KLRewardCallback: the agent's half of the KL penalty, read from the envs' kl_coef (0.05 by default)
agent.learn(total_timesteps=args.steps, callback=[KLRewardCallback(), ScorePrinter()])
env.close()
