"""Rollout throughput: the TextGen-v0 vector env against plain `transformers`, side by side in one run.

Both sides produce the same thing for a batch of prompts: sampled continuations of ``--new-tokens``
tokens, the policy's and the reference's log-prob of every sampled token (so the KL), and a reward-model
score of every text.

* ours: ``TextGenVectorEnv`` (reference KV-cached, one batched step per token) with the path the RL core
  takes: for a model under 20M parameters the env runs reference and policy as one twin pass
  (``policy_model``) and a ``SharedForwardSampler`` samples from it; above, a ``CachedSampler`` runs the
  policy while the env's reference step runs in a background thread; with LoRA, one doubled batch
  (``policy_adapter``). The sampler reports its log-probs to the env.
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

from lm_gym.decoding import torch_threads
from lm_gym.env import TextGenVectorEnv
from lm_gym.models import load_causal_lm, load_sequence_classifier
from lm_gym.rewards import HFRewardModel
from lm_gym.sampling import CachedSampler, SharedForwardSampler
from lm_gym.tasks import get_task
from lm_gym.twin import TWIN_MAX_PARAMETERS


def ours(envs: TextGenVectorEnv, policy, prompts: list[str], new_tokens: int, seed: int) -> float:
    generator = torch.Generator(device=envs.reference.device).manual_seed(seed)  # where the sampling runs
    if envs.shares_policy_pass:  # the env's pass of 2N rows computes the policy's logits too
        sampler = SharedForwardSampler(envs, generator=generator)
        threads = torch.get_num_threads()
    else:  # two weight sets: the env's reference runs in its thread while the policy runs in this one
        sampler = CachedSampler(policy, envs.num_envs, envs.pad_token_id, generator=generator)
        threads = (
            max(1, torch.get_num_threads() - 1) if envs._executor is not None else torch.get_num_threads()
        )
    with torch_threads(threads):
        start = time.perf_counter()
        obs, _ = envs.reset(seed=seed, options={"prompts": prompts})
        for _ in range(new_tokens):
            actions, log_probs = sampler.act(obs)
            envs.set_policy_log_probs(log_probs)
            obs, rewards, terminated, truncated, infos = envs.step(actions)
        elapsed = time.perf_counter() - start
    assert terminated.all() and not truncated.any() and "_score" in infos and np.isfinite(rewards).all()
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

    # Full fine-tuning: policy and reference are two copies of the weights.
    # A small model runs both weight sets in one twin pass; a large one overlaps two passes in two threads.
    small = sum(p.numel() for p in reference.parameters()) < TWIN_MAX_PARAMETERS
    envs = TextGenVectorEnv(args.batch, model=reference, policy_model=policy if small else None, **common)
    how = (
        "one twin pass of both weight sets"
        if small
        else f"async reference {'on' if envs._executor else 'off'}"
    )
    full = compare(
        f"full fine-tune (two weight copies; {how})",
        lambda r: ours(envs, policy, prompts, args.new_tokens, seed=r),
        lambda r: baseline(policy, tokenizer, reward, prompts, args.new_tokens, seed=r, reference=reference),
        args.repeats,
        tokens,
    )
    envs.close()

    # LoRA: the reference is the policy with its adapters off; the env runs both as one doubled batch.
    lora_config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
    lora_policy = get_peft_model(copy.deepcopy(reference), lora_config).eval()
    envs = TextGenVectorEnv(args.batch, model=lora_policy, policy_adapter="default", **common)
    lora = compare(
        "LoRA (reference = adapters off; one shared forward per step)",
        lambda r: ours(envs, None, prompts, args.new_tokens, seed=r),
        lambda r: baseline(lora_policy, tokenizer, reward, prompts, args.new_tokens, seed=r),
        args.repeats,
        tokens,
    )
    envs.close()
    print(f"ratio ours/baseline: full fine-tune {full:.2f}, LoRA {lora:.2f}")


if __name__ == "__main__":
    main()
