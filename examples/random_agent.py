"""A random agent on TextGen-v1: what an episode of "RL for text generation" looks like.

Shows the Gymnasium loop on the environment: the observation is the token sequence so far (prompt +
generated tokens), the action is one token id, the episode ends on EOS or after ``max_new_tokens``, and the
last step carries the reward model's score of the finished text. A random agent writes gibberish, so the
score is near 0; the point is the loop and what ``info`` holds at each step.

Run:
    python examples/random_agent.py                      # SmolLM2-135M (embedded), sentiment task
    python examples/random_agent.py --model tiny --episodes 1 --max-new-tokens 8
"""

import argparse

import gymnasium as gym

import lm_gym  # noqa: F401  (importing it registers TextGen-v1)

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default="smollm2-135m", help="tiny, smollm2-135m, a folder or a Hub id")
parser.add_argument("--episodes", type=int, default=2, help="episodes to play")
parser.add_argument(
    "--max-new-tokens", type=int, default=16, help="the text ends, scored, at this many tokens"
)
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()

# model= is the *reference* LM: the env runs it to price its half of the KL penalty, kl_coef * log pi_ref(a).
# Our agent is not an LM (the agent's half, -kl_coef * log pi(a), would be its own): kl_coef=0, the score alone.
# info_text=True adds the prompt and the text to the info (numbers only by default).
env = gym.make(
    "TextGen-v1", model=args.model, max_new_tokens=args.max_new_tokens, kl_coef=0.0, info_text=True
)
env.action_space.seed(args.seed)  # Discrete(vocab_size): one token id per step
print("observation space:", env.observation_space)
print("action space:     ", env.action_space)

for episode in range(args.episodes):
    # Starting state: a prompt drawn from the task (the opening of a movie review).
    obs, info = env.reset(seed=args.seed + episode)
    print(f"\n=== episode {episode}: prompt {info['prompt']!r}")
    print(f"reset info keys: {sorted(info)}")
    episode_return, steps, done = 0.0, 0, False
    while not done:
        action = env.action_space.sample()  # a random token id: the random policy
        obs, reward, terminated, truncated, info = env.step(action)
        episode_return += reward
        steps += 1
        done = terminated or truncated  # terminated: EOS or max_new_tokens (the env itself never truncates)
        if steps == 1:
            # Every step: ref_log_prob (the reference LM's log-prob of the token we chose), score (0 until the
            # end), prompt_truncated, and with info_text the prompt and the text (completion so far).
            print(f"step-1 info: {info}")
    # The last step's "score" is the reward model's rating (VADER sentiment here).
    print(f"text:   {info['text']!r}")
    print(f"steps {steps}, terminated at {'the length limit' if steps == args.max_new_tokens else 'EOS'}")
    print(f"score {info['score']:+.3f}  return {episode_return:+.3f}  (return = score: kl_coef is 0)")
    # In the observation, the text sits at the right end; -1 marks the padding on its left.
    print(f"observation: {int((obs >= 0).sum())} real tokens of {len(obs)}")
env.close()
