"""Plug your own reward function into TextGen-v1.

Shows the reward protocol: any callable ``(prompts, completions) -> scores`` (lists of strings in, one
float per pair out). The environment calls it once per step with *all* the texts that finished on that
step, so a neural reward model could score them in one batch. Here the reward is hand-written: +1 if the
completion mentions a word, +0.5 if its length is in a range of words. The policy is the initial LM itself
(no training): we sample one completion per environment and print each text with its score.

Run:
    python examples/custom_reward.py --word love
    python examples/custom_reward.py --model tiny --num-envs 2 --max-new-tokens 8
"""

import argparse

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode

import lm_gym  # noqa: F401  (registers TextGen-v1)
from lm_gym.sampling import CachedSampler

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default="smollm2-135m", help="tiny, smollm2-135m, a folder or a Hub id")
parser.add_argument("--word", default="love", help="the word the reward asks for")
parser.add_argument("--num-envs", type=int, default=4, help="completions sampled side by side")
parser.add_argument("--max-new-tokens", type=int, default=24)
args = parser.parse_args()


class MentionAndLength:
    """+1 if the completion contains ``word``, +0.5 if it has between ``lo`` and ``hi`` words."""

    def __init__(self, word: str, lo: int = 5, hi: int = 15) -> None:
        self.word, self.lo, self.hi = word.lower(), lo, hi
        self.calls = []  # how many texts each call scored, to show the batching

    def __call__(self, prompts: list[str], completions: list[str]) -> list[float]:
        self.calls.append(len(completions))
        return [
            float(self.word in text.lower()) + 0.5 * float(self.lo <= len(text.split()) <= self.hi)
            for text in completions  # the prompt is available too (e.g. to reward staying on topic)
        ]


reward_fn = MentionAndLength(args.word)
print("direct call:", reward_fn(["A film"], [f"I {args.word} this film so very much."]))  # [1.5]
reward_fn.calls.clear()

# reward= replaces the task's reward (VADER sentiment); the prompts are still the task's movie reviews.
envs = gym.make_vec(
    "TextGen-v1",
    num_envs=args.num_envs,
    model=args.model,
    reward=reward_fn,
    max_new_tokens=args.max_new_tokens,
    info_text=True,  # prompt and text in the info, to print them
    autoreset_mode=AutoresetMode.NEXT_STEP,  # a row's last step returns its own text and score
)
# The agent: the env's own reference LM, sampled with a KV cache (it returns log pi, the agent's half of the KL).
sampler = CachedSampler(envs.reference, args.num_envs, envs.pad_token_id)
obs, infos = envs.reset(seed=0)
done = np.zeros(args.num_envs, bool)
while not done.all():  # one episode per env; rows that finish restart (autoreset) and are ignored
    actions, log_probs = sampler.act(obs)
    obs, rewards, terminated, truncated, infos = envs.step(actions)
    # the env pays kl_coef * log pi_ref; the agent's half of the KL penalty is -kl_coef * log pi
    rewards = rewards - envs.kl_coef * log_probs.double().numpy()
    for i in np.flatnonzero(~done & (terminated | truncated)):
        # The last step's reward = score - kl_coef * KL; the KL is ~0 here: the policy *is* the reference.
        print(
            f"[{i}] score {infos['score'][i]:+.2f} reward {rewards[i]:+.3f} | "
            f"{infos['prompt'][i]} >>> {infos['text'][i]!r}"
        )
        done[i] = True
print(f"the reward function was called {len(reward_fn.calls)} times, with batches of {reward_fn.calls}")
envs.close()
