"""Collect preference data: sample K completions per prompt, have the panel rank them, keep the pairs.

The second step of RLHF as InstructGPT ran it (Ouyang et al. 2022, Sec. 3.5): labellers rank K outputs of
the model for each prompt and every ranking gives K(K-1)/2 comparisons. Here the labellers are a
simulated :class:`~lm_gym.preferences.panel.AnnotatorPanel`, and every annotator's ranking also counts as
games of an Elo table over the completions (the "Illustrating RLHF" blog), from which each record gets the
normalized scalar rewards ``chosen_score``/``rejected_score``.

Completions are sampled the way ``TextGen-v1`` generates them: the prompt tokenized with the tokenizer's
special tokens and cut to its last ``max_prompt_tokens`` tokens, the text ending at the first stop token
(excluded). Empty completions and repeats of the same text within a prompt are dropped before ranking (a
pair of equal texts teaches nothing), so a prompt may end up with fewer than K.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lm_gym.decoding import left_pad
from lm_gym.preferences.data import PreferenceRecord, ranking_to_pairs, write_jsonl
from lm_gym.preferences.elo import Game, elo_ratings, elo_rewards
from lm_gym.preferences.panel import AnnotatorPanel, Judgement, panel_agreement

__all__ = [
    "Collection",
    "collect_preferences",
    "collection_report",
    "elo_games",
    "rank_completions",
    "sample_completions",
    "write_collection",
]


@torch.no_grad()
def sample_completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    k: int = 4,
    *,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    max_prompt_tokens: int = 64,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = False,
) -> tuple[list[str], list[list[str]]]:
    """Sample ``k`` completions of every prompt with ``model.generate``, batched and seeded.

    Args:
        model: a causal LM.
        tokenizer: its tokenizer.
        prompts: the prompts.
        k: completions per prompt.
        max_new_tokens: length limit of a completion.
        temperature: sampling temperature.
        top_k: keep the k most likely tokens (0 = off; ``generate`` would otherwise apply the model's
            generation config, often an implicit top-k of 50).
        top_p: nucleus sampling (1.0 = off).
        max_prompt_tokens: a prompt keeps its last ``max_prompt_tokens`` tokens, as in ``TextGen-v1``.
        batch_size: sequences generated side by side (a multiple of ``k`` is best).
        seed: batch ``b`` is sampled with seed ``seed + b``; the global RNG is left untouched.
        progress: show a progress bar over the batches.

    Returns:
        the prompts as the model saw them (decoded when cut) and, for each, its ``k`` completions.
    """
    if k < 1 or batch_size < 1 or max_new_tokens < 1:
        raise ValueError(
            f"k, batch_size and max_new_tokens must be >= 1; got {k}, {batch_size}, {max_new_tokens}"
        )
    device = next(model.parameters()).device
    stop_ids = set(_stop_ids(model, tokenizer))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    token_lists, seen = [], []
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        cut = ids[-max_prompt_tokens:]
        token_lists.append(cut)
        seen.append(tokenizer.decode(cut) if len(cut) < len(ids) else prompt)
    per_batch = max(1, batch_size // k)
    completions: list[list[str]] = []
    fork = [device] if device.type == "cuda" else []
    starts = range(0, len(prompts), per_batch)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="sampling", unit="batch")
    for b, start in enumerate(starts):
        rows = [ids for ids in token_lists[start : start + per_batch] for _ in range(k)]
        input_ids, attention_mask = left_pad(rows, pad_id, device)  # (R, T)
        with torch.random.fork_rng(devices=fork):
            torch.manual_seed(seed + b)
            out = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                do_sample=True,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                max_new_tokens=max_new_tokens,
                pad_token_id=pad_id,
                eos_token_id=sorted(stop_ids),
            )
        new = out[:, input_ids.shape[1] :].tolist()  # (R, <= max_new_tokens)
        texts = [tokenizer.decode(_until_stop(row, stop_ids), skip_special_tokens=True) for row in new]
        completions.extend(texts[i : i + k] for i in range(0, len(texts), k))
    return seen, completions


def _stop_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    eos = tokenizer.eos_token_id
    if eos is None:
        eos = model.generation_config.eos_token_id
    if eos is None:
        raise ValueError("sample_completions: the tokenizer and the model define no EOS token")
    return list(eos) if isinstance(eos, list) else [eos]


def _until_stop(row: list[int], stop_ids: set[int]) -> list[int]:
    for n, token in enumerate(row):
        if token in stop_ids:
            return row[:n]
    return row


class Collection(NamedTuple):
    """Everything a collection produced.

    ``records`` are the labelled pairs; ``judgements`` the panel's rankings; ``ratings`` and ``rewards`` the
    Elo rating and z-scored reward of every completion, keyed ``(prompt, completion)``; ``games`` how many
    comparisons each completion took part in; ``stats`` the panel's agreement rates and counts.
    """

    records: list[PreferenceRecord]
    judgements: list[Judgement]
    ratings: dict[tuple[str, str], float]
    rewards: dict[tuple[str, str], float]
    games: dict[tuple[str, str], int]
    stats: dict[str, float]


def elo_games(judgements: Sequence[Judgement]) -> list[Game]:
    """One game per pair of every ranking by the labelling annotators, players keyed ``(prompt, text)``."""
    games = []
    for j in judgements:
        for a in j.labellers:
            for w, lo in ranking_to_pairs(j.ranks[a]):
                games.append(Game((j.prompt, j.completions[w]), (j.prompt, j.completions[lo]), 1.0))
    return games


def collect_preferences(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    panel: AnnotatorPanel,
    *,
    k: int = 24,
    max_new_tokens: int = 16,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    max_prompt_tokens: int = 64,
    batch_size: int = 64,
    elo_k_factor: float = 32.0,
    seed: int = 0,
    progress: bool = False,
) -> Collection:
    """Sample ``k`` completions per prompt, have ``panel`` rank them, and build the records and Elo table.

    Args:
        model: the causal LM whose outputs are compared.
        tokenizer: its tokenizer.
        prompts: the prompts.
        panel: the annotators (it holds the gold scorer and its own seed).
        k: completions per prompt; each ranking gives up to k(k-1)/2 records.
        max_new_tokens: length limit of a completion, in tokens.
        temperature: sampling temperature.
        top_k: top-k sampling (0 = off).
        top_p: nucleus sampling (1.0 = off).
        max_prompt_tokens: prompts keep their last ``max_prompt_tokens`` tokens.
        batch_size: sequences generated side by side.
        elo_k_factor: ``K`` of the Elo updates.
        seed: seeds the sampling.
        progress: show a progress bar while sampling.
    """
    if k < 2:
        raise ValueError(f"collect_preferences: k must be >= 2 to compare completions; got {k}")
    if not prompts:
        raise ValueError("collect_preferences: no prompts to collect completions of")
    seen, sampled = sample_completions(
        model,
        tokenizer,
        prompts,
        k,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        max_prompt_tokens=max_prompt_tokens,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
    )
    return rank_completions(seen, sampled, panel, elo_k_factor=elo_k_factor)


def rank_completions(
    prompts: Sequence[str],
    completions: Sequence[Sequence[str]],
    panel: AnnotatorPanel,
    *,
    elo_k_factor: float = 32.0,
) -> Collection:
    """Have ``panel`` rank given completions, and build the records and the Elo table.

    Empty completions and repeated texts of a prompt are dropped first; prompts left with fewer than two
    completions are skipped.

    Args:
        prompts: N prompts.
        completions: for each prompt, its completions.
        panel: the annotators (it holds the gold scorer and its own seed).
        elo_k_factor: ``K`` of the Elo updates.
    """
    kept = [(p, list(dict.fromkeys(c for c in cs if c.strip()))) for p, cs in zip(prompts, completions)]
    kept = [(p, cs) for p, cs in kept if len(cs) >= 2]
    judgements = panel.judge([p for p, _ in kept], [cs for _, cs in kept])
    games = elo_games(judgements)
    ratings = elo_ratings(games, k_factor=elo_k_factor)
    rewards = elo_rewards(ratings)
    counts = Counter(player for g in games for player in (g.a, g.b))
    records = [
        PreferenceRecord(
            prompt=j.prompt,
            chosen=j.completions[w],
            rejected=j.completions[lo],
            chosen_score=round(rewards[(j.prompt, j.completions[w])], 4),
            rejected_score=round(rewards[(j.prompt, j.completions[lo])], 4),
            agreement=agreement,
        )
        for j in judgements
        for w, lo, agreement in j.pairs
    ]
    stats = panel_agreement(judgements, [a.name for a in panel.annotators])
    stats.update(
        prompts=float(len(prompts)),
        ranked_prompts=float(len(judgements)),
        completions=float(sum(len(cs) for cs in completions)),
        dropped_completions=float(
            sum(len(cs) for cs in completions) - sum(len(j.completions) for j in judgements)
        ),
    )
    return Collection(records, judgements, ratings, rewards, dict(counts), stats)


def write_collection(collection: Collection, out: str | Path, settings: dict | None = None) -> list[Path]:
    """Write the records to ``out`` (JSONL), the Elo table to ``<out>.elo.jsonl`` and the panel's
    statistics with ``settings`` to ``<out>.meta.json``; returns the three paths."""
    out = Path(out)
    paths = [
        write_jsonl(collection.records, out),
        out.with_suffix(".elo.jsonl"),
        out.with_suffix(".meta.json"),
    ]
    with paths[1].open("w", encoding="utf-8") as f:
        for (prompt, text), rating in sorted(collection.ratings.items(), key=lambda kv: -kv[1]):
            row = {
                "prompt": prompt,
                "completion": text,
                "rating": round(rating, 2),
                "reward": round(collection.rewards[(prompt, text)], 4),
                "games": collection.games.get((prompt, text), 0),
            }
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    meta = {"settings": settings or {}, "panel": collection.stats}
    paths[2].write_text(json.dumps(meta, indent=2) + "\n")
    return paths


def collection_report(stats: dict[str, float]) -> str:
    """The panel's statistics of a :class:`Collection` in words."""
    return (
        f"panel: inter-annotator agreement {stats['inter_annotator']:.3f}, annotators vs gold "
        f"{stats['annotator_gold']:.3f}, panel labels vs gold {stats['panel_gold']:.3f}; "
        f"{int(stats['pairs'])} labelled pairs from {int(stats['ranked_prompts'])} prompts "
        f"({int(stats['completions'])} completions, {int(stats['dropped_completions'])} empty or repeated); "
        f"gold ties {stats['gold_ties']:.3f}"
    )
