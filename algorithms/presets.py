"""Every preset of the ``lm-gym`` commands, in one place, each with where its numbers came from.

A preset is a dict of keyword arguments: of the algorithm (``learning_rate``, ``n_epochs``...) for the RL
settings, of :class:`~algorithms.grid.BenchmarkSpec` or :class:`~algorithms.pipeline.PipelineConfig` for a
whole run. The commands put what the user gives on top (:func:`algorithms.grid.preset_spec`,
:func:`algorithms.pipeline.preset_config`).
"""

from __future__ import annotations

from typing import Any

from lm_gym.env import DEFAULT_MODEL

__all__ = [
    "CRITIC_FREE_STEPS",
    "DEMO",
    "DEMO_EVAL_PROMPTS",
    "DEMO_ITERATIONS",
    "DEMO_SEEDS",
    "DEMO_TINY",
    "GRID",
    "GRID_QUICK",
    "KL_COEF",
    "PIPELINE_PRESETS",
    "PPO_SENTIMENT",
    "TINY_LETTERS",
]

# ------------------------------------------------------------------------------------ the PPO preset
# PPO on SmolLM2-135M and the sentiment task: learning rate 6e-5 (the demo's first preset had 3e-5; 6e-5
# measured gold 0.18 -> 0.49 in 20 iterations, commit b3ef62d) and 2 epochs per rollout (set with the demo,
# half the update time of PPO's default 4; no comparison recorded). The demo, the benchmark grid and the
# pipeline all start from it.
PPO_SENTIMENT: dict[str, Any] = dict(learning_rate=6e-5, n_epochs=2)
KL_COEF = 0.05  # the core's default beta, held fixed (the demo ends at 8.8 nats per text after 30 iterations)

# ------------------------------------------------------------------------------- lm-gym demo (README)
# 16 texts of 24 tokens per iteration, minibatches of 8: 4 steps per epoch.
DEMO: dict[str, Any] = dict(n_envs=16, max_new_tokens=24, **PPO_SENTIMENT, batch_size=8, kl_coef=KL_COEF)
DEMO_SEEDS = (0, 1, 2)
# 30 iterations and the whole held-out split: with 20 iterations and 32 prompts the mean gold lift over 3 seeds
# was +0.14 +/- 0.13 (one seed +0.24, one -0.01), the evaluation's own noise about +/-0.05 (README).
DEMO_ITERATIONS, DEMO_EVAL_PROMPTS = 30, 80
# The smoke run on `tiny`: a random 0.3M model has no sentiment to improve; fewer texts, a larger step.
DEMO_TINY: dict[str, Any] = dict(n_envs=4, learning_rate=1e-3)

# ------------------------------------------------------------------ lm-gym benchmark (the grid)
# PPO's learning rate and optimizer steps per iteration (2 epochs of minibatches of 4 texts) for the critic-free
# methods, whose defaults take one on-policy step per rollout (TRL's).
CRITIC_FREE_STEPS: dict[str, Any] = dict(
    learning_rate=PPO_SENTIMENT["learning_rate"], n_epochs=2, batch_size=4
)
# Shared settings of the grid on the embedded default: 8 texts of 24 tokens per iteration, 10 iterations
# (PPO, A2C, TRPO and NLPO x 2 seeds took about 75 minutes on 2 CPU cores).
GRID: dict[str, Any] = dict(
    model=DEFAULT_MODEL,
    task="sentiment",
    iterations=10,
    eval_prompts=32,
    settings=dict(n_envs=8, max_new_tokens=24, kl_coef=KL_COEF),
    # Per-algorithm settings on top (the ones that differ from each class's defaults; see docs/algorithms.md).
    algo_settings={
        # the PPO preset; minibatches of 4 texts: 4 steps per iteration
        "ppo": dict(**PPO_SENTIMENT, batch_size=4),
        "nlpo": dict(**PPO_SENTIMENT, batch_size=4),
        "a2c": dict(learning_rate=1.5e-4, batch_size=4),  # one step per rollout where PPO takes 4
        # learning_rate is the critic's only (sb3-contrib's 1e-3); 5 conjugate-gradient steps instead of 15
        # keep an iteration at ~3x PPO's on 2 CPU cores (each is a double backward through the whole LM)
        "trpo": dict(batch_size=4, learning_rate=1e-3, cg_max_steps=5),
        # The critic-free methods and the recipes of their fixes (algorithms.run.RECIPES) on PPO's terms: its
        # learning rate and its 4 optimizer steps per iteration (2 epochs of 2 steps of 4 texts), 2 prompts x 4
        # texts per rollout (GSPO's ratio moves only from a rollout's second step on); each keeps its own KL
        # placement.
        **{
            name: dict(**CRITIC_FREE_STEPS, group_size=4)
            for name in ("grpo", "rloo", "dr_grpo", "dapo", "gspo", "reinforce_pp_baseline")
        },
        "reinforce_pp": dict(**CRITIC_FREE_STEPS),  # plain REINFORCE++: one text per prompt
    },
)
# About a minute per algorithm on `tiny` and the toy "letters" task (a random 0.3M model has no sentiment
# to improve, but learns to write lowercase letters): for teaching and the CI smoke test. Every algorithm
# takes the same settings (its class's defaults beyond these); the quick pipeline's RL uses them too.
TINY_LETTERS: dict[str, Any] = dict(max_new_tokens=8, kl_coef=KL_COEF, learning_rate=2e-3)
GRID_QUICK: dict[str, Any] = dict(
    model="tiny",
    task="letters",
    iterations=20,
    eval_prompts=16,
    settings=dict(n_envs=8, **TINY_LETTERS, checkpoint_every=5),
    algo_settings={},
)

# ---------------------------------------------------------------------------------- lm-gym pipeline
# `lm-gym pipeline --preset`, PipelineConfig fields (the others keep the dataclass's defaults). The default
# RLHF run on the embedded model: step 3 is the grid's PPO cell. One that pushes the policy hard against the
# learned reward model (no KL penalty, a larger learning rate, more iterations, a reward model from few
# comparisons, as Gao et al. 2022 find smaller proxies over-optimized sooner) to show over-optimization,
# judged by a gold scorer that repetition cannot game (`sentiment-fluent`: VADER alone rises with "great
# great great"; docs/pipeline.md: the proxy rose to 0.555 while gold peaked at 0.708 and fell to 0.355). And
# a quick one on `tiny` and the toy letters task (tests, teaching).
PIPELINE_PRESETS: dict[str, dict[str, Any]] = {
    "default": dict(rl_settings={**GRID["settings"], **GRID["algo_settings"]["ppo"]}),
    "overoptimize": dict(
        task="sentiment-fluent",
        collect_prompts=200,
        k=4,
        collect_max_new_tokens=24,
        rm_epochs=2,
        rm_learning_rate=5e-5,
        rm_batch_size=32,
        iterations=24,
        eval_every=3,
        eval_prompts=64,
        rl_settings=dict(
            n_envs=8, max_new_tokens=24, kl_coef=0.0, learning_rate=2e-4, n_epochs=2, batch_size=4
        ),
    ),
    "quick": dict(
        model="tiny",
        task="letters",
        collect_prompts=16,
        k=3,
        collect_max_new_tokens=8,
        rm_model="tiny",
        rm_epochs=2,
        rm_learning_rate=1e-3,
        rm_batch_size=16,
        iterations=4,
        eval_every=2,
        eval_prompts=8,
        rl_settings=dict(n_envs=4, **TINY_LETTERS, checkpoint_every=2),
    ),
}
