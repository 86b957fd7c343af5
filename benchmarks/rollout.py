"""Rollout throughput: the TextGen-v1 vector env against plain `transformers`, side by side in one run.

Both sides produce the same thing for a batch of prompts: sampled continuations of ``--new-tokens``
tokens, the policy's and the reference's log-prob of every sampled token (so the KL), and a reward-model
score of every text.

* ours: ``TextGenVectorEnv`` (reference KV-cached, one batched step per token) with the path the RL core
  takes: with full fine-tuning a ``CachedSampler`` runs the policy while the env's reference step runs in a
  background thread (20M parameters or more); with LoRA, the env steps the shared pass of
  ``algorithms.shared_pass`` (reference and policy rows as one doubled batch) as its ``reference_decoder``
  and the agent samples from the policy's rows. The agent adds its half of the KL, ``-beta * log pi``, to
  the env's rewards.
* baseline: ``policy.generate`` (returning the sampling scores for the policy log-probs), then one
  teacher-forced reference forward over prompt + completion, then one reward-model pass.

Policy and reference are two separate copies of the same weights, as at the start of RL fine-tuning.
Each side runs once untimed (warm-up), then ``--repeats`` times, alternating, repeat r seeding both sides
with r; the best time of each is kept. Last line: the ratio of tokens/s (ours / baseline); above 1.0 means
the env is faster. The two sides draw different texts, and the reward model's pass costs more for longer
ones: on ``tiny``, where that pass is a third of a run, use more repeats to even out the texts' lengths.

    python benchmarks/rollout.py --model tiny --repeats 15
    python benchmarks/rollout.py --model smollm2-135m --batch 16 --new-tokens 48
"""

from __future__ import annotations

import argparse
import copy
import time
from contextlib import nullcontext

import numpy as np
import torch
from gymnasium.vector import AutoresetMode
from peft import LoraConfig, get_peft_model

from algorithms.shared_pass import shared_lora_decoder
from lm_gym.decoding import torch_threads
from lm_gym.env import TextGenVectorEnv
from lm_gym.models import load_causal_lm, load_sequence_classifier
from lm_gym.rewards import HFRewardModel
from lm_gym.sampling import CachedSampler, policy_warpers, sample, sampling_filters
from lm_gym.tasks import get_task


class SharedPassSampler:
    """Samples from the policy's rows of the shared pass the env steps as its reference (LoRA)."""

    def __init__(self, shared, generator: torch.Generator) -> None:
        self.shared, self.generator = shared, generator
        self.law, self.filters = policy_warpers(1.0), sampling_filters()

    @torch.no_grad()
    def act(self, obs: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.shared.twin_logits  # (N, V) at the env's current observations
        last = torch.as_tensor(obs[:, -1:])  # (N, 1)
        return sample(logits, last, self.law, self.filters, self.generator, entropy=False)[:2]


def ours(
    envs: TextGenVectorEnv, policy, prompts: list[str], new_tokens: int, seed: int, shared=None
) -> float:
    generator = torch.Generator(device=envs.reference.device).manual_seed(seed)  # where the sampling runs
    if shared is not None:  # the env's pass of 2N rows computes the policy's logits too
        sampler = SharedPassSampler(shared, generator)
    else:  # two weight sets: the env's reference runs in its thread while the policy runs in this one
        sampler = CachedSampler(policy, envs.num_envs, envs.pad_token_id, generator=generator)
    busy = envs.reference_threads
    with torch_threads(max(1, torch.get_num_threads() - busy) if busy else None):
        start = time.perf_counter()
        obs, _ = envs.reset(seed=seed, options={"prompts": prompts})
        for _ in range(new_tokens):
            actions, log_probs = sampler.act(obs)
            obs, rewards, terminated, truncated, infos = envs.step(actions)
            rewards = rewards - envs.kl_coef * log_probs.double().numpy()  # the agent's half of the KL
        elapsed = time.perf_counter() - start
    assert terminated.all() and not truncated.any() and infos["_score"].all() and np.isfinite(rewards).all()
    return elapsed


@torch.no_grad()
def baseline(
    policy, tokenizer, reward: HFRewardModel, prompts: list[str], new_tokens: int, seed: int, reference=None
) -> float:
    """generate + one reference forward (``reference``, or ``policy`` with its adapters off) + RM."""
    torch.manual_seed(seed)
    start = time.perf_counter()
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    out = policy.generate(
        **batch,
        do_sample=True,
        top_k=0,  # plain sampling from the full softmax, as on our side
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        return_dict_in_generate=True,
        output_scores=True,
        pad_token_id=tokenizer.pad_token_id,
    )
    completion = out.sequences[:, batch["input_ids"].shape[1] :]  # (B, T)
    scores = torch.stack(out.scores, dim=1).float()  # (B, T, V)
    logp = torch.log_softmax(scores, -1).gather(-1, completion[..., None])[..., 0]  # (B, T)
    mask = torch.cat([batch["attention_mask"], torch.ones_like(completion)], dim=1)
    with policy.disable_adapter() if reference is None else nullcontext():
        ref_logits = (reference or policy)(input_ids=out.sequences, attention_mask=mask).logits
    ref_logits = ref_logits[:, -new_tokens - 1 : -1].float()
    ref_logp = torch.log_softmax(ref_logits, -1).gather(-1, completion[..., None])[..., 0]  # (B, T)
    kl = logp - ref_logp
    texts = tokenizer.batch_decode(completion, skip_special_tokens=True)
    score = reward(prompts, texts)
    assert torch.isfinite(kl).all() and np.isfinite(score).all()
    return time.perf_counter() - start


def compare(label: str, run_ours, run_baseline, repeats: int, tokens: int) -> float:
    run_ours(repeats), run_baseline(repeats)  # warm-up, untimed: first-call allocations and caches
    t_ours, t_base = [], []
    for r in range(repeats):  # alternate, so that a noisy neighbour hurts both sides alike
        t_ours.append(run_ours(r))
        t_base.append(run_baseline(r))
    ours_tps, base_tps = tokens / min(t_ours), tokens / min(t_base)
    print(f"{label}")
    print(
        f"  ours     (TextGen vector env + sampler)       : {ours_tps:8.1f} tokens/s  runs {np.round(t_ours, 2).tolist()} s"
    )
    print(
        f"  baseline (generate + reference forward + RM) : {base_tps:8.1f} tokens/s  runs {np.round(t_base, 2).tolist()} s"
    )
    print(f"  ratio {ours_tps / base_tps:.2f}")
    return ours_tps / base_tps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny", help="tiny, smollm2-135m, a folder or a Hub id")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reward-model", default="minilm-l6", help="reward-model backbone (scalar head)")
    args = parser.parse_args()

    torch.manual_seed(0)
    reference, tokenizer = load_causal_lm(args.model)
    reference.requires_grad_(False)
    policy = copy.deepcopy(reference)
    rm_model, rm_tokenizer = load_sequence_classifier(args.reward_model, num_labels=1)
    reward = HFRewardModel(rm_model, rm_tokenizer)
    prompts = list(get_task("sentiment").prompts("train")[: args.batch])
    common = dict(
        tokenizer=tokenizer,
        reward=reward,
        max_new_tokens=args.new_tokens,
        stop_token_ids=[],  # both sides generate exactly --new-tokens tokens
        autoreset_mode=AutoresetMode.DISABLED,
    )
    tokens = args.batch * args.new_tokens
    print(
        f"model={args.model} batch={args.batch} new_tokens={args.new_tokens} threads={torch.get_num_threads()}"
    )

    # Full fine-tuning: policy and reference are two copies of the weights; from 20M parameters on the env's
    # reference pass overlaps the policy's in a background thread.
    envs = TextGenVectorEnv(args.batch, model=reference, **common)
    full = compare(
        f"full fine-tune (two weight copies; async reference {'on' if envs.reference_threads else 'off'})",
        lambda r: ours(envs, policy, prompts, args.new_tokens, seed=r),
        lambda r: baseline(policy, tokenizer, reward, prompts, args.new_tokens, seed=r, reference=reference),
        args.repeats,
        tokens,
    )
    envs.close()

    # LoRA: the reference is the policy with its adapters off; the env runs both as one doubled batch.
    lora_config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
    lora_policy = get_peft_model(copy.deepcopy(reference), lora_config).eval()
    shared = shared_lora_decoder(lora_policy, args.batch, tokenizer.pad_token_id, "default")
    envs = TextGenVectorEnv(args.batch, model=lora_policy, reference_decoder=shared, **common)
    lora = compare(
        "LoRA (reference = adapters off; one shared forward per step)",
        lambda r: ours(envs, None, prompts, args.new_tokens, seed=r, shared=shared),
        lambda r: baseline(lora_policy, tokenizer, reward, prompts, args.new_tokens, seed=r),
        args.repeats,
        tokens,
    )
    envs.close()
    print(f"ratio ours/baseline: full fine-tune {full:.2f}, LoRA {lora:.2f}")


if __name__ == "__main__":
    main()
