"""The toy setting the algorithm tests share: four prompts, a reward for lowercase letters (about 0.1 for a
random model, learnable in seconds), 8 envs x 8 tokens, no KL penalty, one seed."""

import copy

import numpy as np
import torch
from transformers import BertConfig, BertForSequenceClassification

from algorithms.policy import LMActorCriticPolicy
from lm_gym.models import tiny_tokenizer
from lm_gym.rewards import LowercaseShare

PROMPTS = ["Hello", "The film", "Wow", "It was"]
lowercase_share = LowercaseShare()
POLICY_ARGS = (
    "lora_r",
    "lora_target_modules",
    "temperature",
    "top_k",
    "top_p",
    "separate_critic",
    "gradient_checkpointing",
)


def toy_algo(algo_cls, model_and_tokenizer, **kwargs):
    """``algo_cls`` on a copy of the model with the toy settings; ``kwargs`` override them (the policy's
    own arguments go to the policy)."""
    model, tokenizer = model_and_tokenizer
    policy_kwargs = {k: kwargs.pop(k) for k in POLICY_ARGS if k in kwargs}
    torch.manual_seed(kwargs.get("seed", 0))  # the LoRA adapters' initialisation, as from_pretrained seeds it
    policy = LMActorCriticPolicy(copy.deepcopy(model), tokenizer, **policy_kwargs)
    settings = dict(
        prompts=PROMPTS,
        reward=lowercase_share,
        n_envs=8,
        max_new_tokens=8,
        learning_rate=1e-3,
        kl_coef=0.0,
        verbose=0,
        seed=0,
    )
    return algo_cls(policy, **{**settings, **kwargs})


def make_rewards_nan(algo) -> None:
    """From now on the algorithm's env returns NaN rewards (a reward function's NaN is refused before this)."""
    step = algo.envs.step

    def nan_rewards(actions):
        obs, rewards, *rest = step(actions)
        return obs, np.full_like(rewards, np.nan), *rest

    algo.envs.step = nan_rewards


def tiny_bert_classifier(seed: int = 0, num_labels: int = 1, max_positions: int = 128):
    """A 1-layer BERT sequence classifier over the tiny byte tokenizer (a reward model for tests), its
    weights fixed by ``seed`` without touching the global RNG; ``(model, tokenizer)``."""
    tokenizer = tiny_tokenizer()
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=max_positions,
        num_labels=num_labels,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return BertForSequenceClassification(config), tokenizer


def check_same_seed_and_resume(make, tmp_path, iterations: int = 4, crash_at: int = 2):
    """Two runs of ``make(**kwargs)`` (an algorithm with fixed settings) with the same seed are bit-equal, and
    a run resumed from its checkpoint after ``crash_at`` iterations ends bit-equal to the uninterrupted run;
    return the uninterrupted run (its folder ``tmp_path / "whole"``)."""
    whole = make(run_dir=tmp_path / "whole", checkpoint_every=crash_at)
    whole.learn(iterations)
    again = make()
    again.learn(iterations)
    for a, b in zip(whole.policy.parameters(), again.policy.parameters()):
        assert torch.equal(a, b)

    first = make(run_dir=tmp_path / "resumed", checkpoint_every=crash_at)
    first.learn(crash_at)  # "crash" here
    resumed = make(run_dir=tmp_path / "resumed", checkpoint_every=crash_at)
    resumed.load_checkpoint(tmp_path / "resumed")
    assert resumed.iteration == crash_at
    resumed.learn(iterations)
    for a, b in zip(whole.policy.parameters(), resumed.policy.parameters()):
        assert torch.equal(a, b)
    return whole
