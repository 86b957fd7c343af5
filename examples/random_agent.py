"""A random agent on TextGen-v0: what an episode of "RL for text generation" looks like.

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

import lm_gym  # noqa: F401  (importing it registers TextGen-v0)

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default="smollm2-135m", help="tiny, smollm2-135m, a folder or a Hub id")
parser.add_argument("--episodes", type=int, default=2, help="episodes to play")
parser.add_argument(
    "--max-new-tokens", type=int, default=16, help="the text ends, scored, at this many tokens"
)
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()

# model= is the *reference* LM: the env runs it to price the KL penalty. Our agent is not an LM and has no
# log-probs to report, so the KL term cannot be computed: kl_coef=0 says so (else the env warns).
env = gym.make("TextGen-v0", model=args.model, max_new_tokens=args.max_new_tokens, kl_coef=0.0)
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
            # Every step: prompt, text (completion so far), ref_log_prob (the reference LM's log-prob of the
            # token we chose) and kl_penalty. With no log-probs from the agent there is no KL (no
            # policy_log_prob/kl keys) and the penalty is 0.
            print(f"step-1 info: {info}")
    # The last step's info also holds "score", the reward model's rating (VADER sentiment here).
    print(f"final info keys: {sorted(info)}")
    print(f"text:   {info['text']!r}")
    print(f"steps {steps}, terminated at {'the length limit' if steps == args.max_new_tokens else 'EOS'}")
    print(
        f"score {info['score']:+.3f}  return {episode_return:+.3f}  (return = score: no KL without log-probs)"
    )
    # In the observation, the text sits at the right end; attention_mask marks it (left padding).
    print(f"observation: {int(obs['attention_mask'].sum())} real tokens of {len(obs['input_ids'])}")
env.close()
