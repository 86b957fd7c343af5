"""Score a policy on a task's prompts: reward, gold score, KL, perplexity, diversity, length.

One pass over the prompts through ``TextGenVectorEnv`` (so the same reward and KL semantics as training),
with a KV-cached sampler for the policy. Metrics, per episode then averaged:

* ``score``: the env's reward-model score of the text; ``gold``: the task's gold scorer (VADER for
  sentiment), equal to ``score`` when the reward *is* the gold scorer;
* ``kl``: sum over the text of ``log pi - log pi_ref`` (k1), nats per text;
* ``perplexity``: ``exp(-mean log pi_ref)`` of the generated tokens under the reference (fluency);
* ``distinct_1`` / ``distinct_2``: unique words / word bigrams over all texts (Li et al. 2016);
* ``length``: generated tokens per text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from gymnasium.vector import AutoresetMode
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lm_gym.env import TextGenVectorEnv
from lm_gym.rewards import RewardFunction, as_text_list, checked_scores
from lm_gym.sampling import CachedSampler
from lm_gym.tasks import Task, get_task

__all__ = ["EvalResult", "distinct_n", "evaluate"]


@dataclass
class EvalResult:
    """Averaged metrics and the per-text samples ``(prompt, completion, score, gold, kl)``."""

    metrics: dict[str, float]
    samples: list[tuple[str, str, float, float, float]] = field(default_factory=list)


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Unique word n-grams over all n-grams in ``texts`` (0 when there are none)."""
    grams = [
        tuple(words[i : i + n]) for t in texts for words in [t.split()] for i in range(len(words) - n + 1)
    ]
    return len(set(grams)) / len(grams) if grams else 0.0


@torch.no_grad()
def evaluate(
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    reference: PreTrainedModel,
    task: str | Task = "sentiment",
    split: str = "eval",
    prompts: Sequence[str] | None = None,
    reward: str | RewardFunction | Callable | None = None,
    num_prompts: int | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 48,
    max_prompt_tokens: int = 64,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
) -> EvalResult:
    """Generate one text per prompt with ``policy`` and measure it against ``reference``.

    Args:
        policy: the model to evaluate (a LoRA policy merged first, as ``save_pretrained`` exports it).
        tokenizer: the shared tokenizer.
        reference: the frozen initial model (KL and perplexity are measured against it).
        task: the task (prompts and gold scorer).
        split: which prompts of the task.
        prompts: prompts to use instead.
        reward: the reward function (default: the task's gold scorer).
        num_prompts: evaluate on the first ``num_prompts`` prompts only (None: all).
        batch_size: texts generated side by side.
        max_new_tokens: text length limit, in tokens.
        max_prompt_tokens: prompt length limit.
        temperature: sampling temperature.
        top_k: top-k sampling (0 = off).
        top_p: nucleus sampling (1.0 = off).
        seed: seeds the sampling.
    """
    if num_prompts is not None and num_prompts < 1:  # a negative one would slice from the end
        raise ValueError(f"evaluate: num_prompts must be >= 1 (None: all); got {num_prompts}")
    task = get_task(task) if isinstance(task, str) else task
    prompts = as_text_list(prompts, "prompts") if prompts is not None else list(task.prompts(split))
    prompts = prompts[:num_prompts]
    if not prompts:
        raise ValueError("evaluate: no prompts to evaluate")
    gold_fn = task.make_reward()
    envs = TextGenVectorEnv(
        min(batch_size, len(prompts)),
        model=reference,
        tokenizer=tokenizer,
        task=task,
        reward=reward if reward is not None else gold_fn,
        prompts=prompts,
        kl_coef=0.0,
        max_new_tokens=max_new_tokens,
        max_prompt_tokens=max_prompt_tokens,
        temperature=temperature,
        device=reference.device,  # a reward model named by `reward` runs beside the reference, in its dtype
        dtype=reference.dtype,
        info_text=True,
        autoreset_mode=AutoresetMode.NEXT_STEP,  # a row's last step returns its own text and score
    )
    samples, lengths, ref_lps = [], [], []
    generator = torch.Generator(device=policy.device).manual_seed(seed)  # the sampler draws on the policy's
    for start in range(0, len(prompts), envs.num_envs):
        batch = prompts[start : start + envs.num_envs]
        n = len(batch)
        batch = batch + batch[: envs.num_envs - n]  # fill the last batch; extra rows are ignored
        sampler = CachedSampler(
            policy,
            envs.num_envs,
            envs.pad_token_id,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            generator=generator,
        )
        obs, _ = envs.reset(seed=seed + start, options={"prompts": batch})
        done = np.zeros(envs.num_envs, dtype=bool)
        done[n:] = True
        kl, length = np.zeros(envs.num_envs), np.zeros(envs.num_envs, dtype=np.int64)
        while not done.all():  # a row that ends restarts (next-step autoreset) and is ignored after
            actions, log_probs = sampler.act(obs)
            obs, _, terminated, truncated, infos = envs.step(actions)
            running = ~done
            # k1 per token: the sampler's log pi against the env's log pi_ref
            kl[running] += log_probs.double().cpu().numpy()[running] - infos["ref_log_prob"][running]
            length[running] += 1
            ref_lps.extend(infos["ref_log_prob"][running].tolist())
            for i in np.flatnonzero(running & (terminated | truncated)):
                samples.append([batch[i], infos["text"][i], float(infos["score"][i]), 0.0, float(kl[i])])
                lengths.append(int(length[i]))
                done[i] = True
    envs.close()
    golds = checked_scores(gold_fn, [s[0] for s in samples], [s[1] for s in samples])
    for s, g in zip(samples, golds):
        s[3] = float(g)
    texts = [s[1] for s in samples]
    metrics = {
        "score": float(np.mean([s[2] for s in samples])),
        "gold": float(golds.mean()),
        "gold_positive": float((golds > 0.05).mean()),
        "kl": float(np.mean([s[4] for s in samples])),
        "perplexity": float(np.exp(-np.mean(ref_lps))),
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "length": float(np.mean(lengths)),
        "texts": float(len(samples)),
    }
    return EvalResult(metrics, [tuple(s) for s in samples])
