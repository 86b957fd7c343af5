"""Train a reward model on preference records: a scalar head fitted with the Bradley-Terry loss.

The reward model ``r(x)`` is a sequence classifier with one output (``num_labels=1``), by default
all-MiniLM-L6-v2 (``"minilm-l6"``). For a record whose ``chosen`` beat ``rejected`` (InstructGPT, Ouyang
et al. 2022, Eq. 1; Anthropic HH, Bai et al. 2022; TRL's ``RewardTrainer``)::

    loss = -log sigmoid(r(prompt + chosen) - r(prompt + rejected) - margin)
           + center_coef * mean((r_chosen + r_rejected)^2)

The margin (Llama 2, Touvron et al. 2023, Sec. 3.2.2) is the record's own ``margin`` when it has one,
else the ``margin`` argument; the second term (Eisenstein et al. 2023, "Helping or Herding?", with
coefficient 0.01) keeps the rewards centred on 0, which the Bradley-Terry loss alone leaves free.
With ``vote_share`` (the default) a record's label is the share of annotators who preferred ``chosen``
(its ``agreement``) rather than 1: the cross-entropy to that share is the Bradley-Terry likelihood of every
annotator's vote, so a 3-2 split pulls less than a 5-0 verdict.

All pairs of a prompt are put in the same batch where they fit, and each distinct text of a batch goes
through the model once: K ranked completions cost K forward passes for their K(K-1)/2 pairs (the
InstructGPT trick, Sec. 3.5, which also keeps the correlated pairs of one prompt from being seen in
separate steps). Dropout is off, as in TRL (``disable_dropout``).

The held-out split is by prompt, so no held-out completion's prompt was seen in training. Reported:
``eval/accuracy``, the share of held-out pairs with ``r_chosen > r_rejected`` (agreement with the
annotators' labels); with a gold scorer, ``eval/accuracy_gold``, the same against the gold order of the
pair, over the pairs on which the gold scores differ, and ``eval/labels_gold``, how often the labels
themselves agree with gold on those pairs (what a model that copied the labels would reach); and the same
on the pairs the annotators agree on (``eval/accuracy_gold_confident``, see :func:`evaluate_reward_model`).

The saved folder (``save_pretrained``: ``config.json``, ``model.safetensors``, the tokenizer, and
``reward_model.json`` with the settings and metrics) is what ``TextGen-v1`` takes as ``reward=FOLDER``. Its
``config.json`` says what the model reads, ``"lm_gym_reward_input": {"include_prompt": true, "append_eos":
false, "chat_template": false}`` (:class:`lm_gym.rewards.RewardInput`), and ``"problem_type": "regression"``,
so that ``transformers.pipeline("text-classification", model=FOLDER)`` returns the raw score (no sigmoid) of
``prompt + completion`` (or of the completion alone), the score the environment gives.

Under ``accelerate launch``/``torchrun`` (data parallel, :mod:`algorithms.common.distributed`) every process forms the
same global batches (the same seed) and takes a contiguous share of each; its loss is weighted by its share of
the batch's pairs and the gradients are averaged, so N processes take the step one process takes on the whole
batch. Every process evaluates (identically); only the main process logs and saves the folder.

With a ``checkpoint_dir`` the main process writes a checkpoint at the end of every epoch (weights, optimizer
state, the batch-order generator, the torch RNG states, the history; the trainer skeleton's,
:mod:`algorithms.common.trainer`);
``resume=True`` continues from the latest one and, on CPU, ends as the uninterrupted run does.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from algorithms.common.distributed import ProcessGroup
from algorithms.common.nonfinite import check_finite
from algorithms.common.trainer import Trainer, data_digest
from lm_gym.preferences.data import PreferenceRecord
from lm_gym.rewards import REWARD_INPUT, REWARD_MODEL_INFO, RewardFunction, RewardInput

__all__ = [
    "RewardModelResult",
    "accuracy_report",
    "bradley_terry_loss",
    "evaluate_reward_model",
    "save_reward_model",
    "score_texts",
    "split_by_prompt",
    "train_reward_model",
]


class RewardModelResult(NamedTuple):
    """The trained model and tokenizer, the final metrics and one row of metrics per epoch."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    metrics: dict[str, float]
    history: list[dict[str, float]]


def bradley_terry_loss(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    margin: torch.Tensor | float = 0.0,
    center_coef: float = 0.0,
    targets: torch.Tensor | None = None,
) -> torch.Tensor:
    """``mean(-log sigmoid(r_c - r_r - margin)) + center_coef * mean((r_c + r_r)^2)``, shapes (P,).

    With ``targets`` (P,), the probability that ``chosen`` is preferred (e.g. the annotators' vote share),
    the first term is the cross-entropy ``-(t log sigmoid(d) + (1 - t) log sigmoid(-d))``,
    ``d = r_c - r_r - margin``: the Bradley-Terry likelihood of every annotator's vote, not only the
    majority's.
    """
    d = r_chosen - r_rejected - margin
    if targets is None:
        loss = -F.logsigmoid(d).mean()
    else:
        loss = -(targets * F.logsigmoid(d) + (1.0 - targets) * F.logsigmoid(-d)).mean()
    if center_coef:
        loss = loss + center_coef * ((r_chosen + r_rejected) ** 2).mean()  # Eisenstein et al. 2023
    return loss


def split_by_prompt(
    records: Sequence[PreferenceRecord], eval_fraction: float, seed: int = 0
) -> tuple[list[PreferenceRecord], list[PreferenceRecord]]:
    """A seeded (train, held-out) split with every prompt's records on one side.

    With a single distinct prompt (HH-RLHF keeps it inside the texts) the records themselves are split.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1); got {eval_fraction}")
    prompts = list(dict.fromkeys(r.prompt for r in records))
    keys = prompts if len(prompts) > 1 else list(range(len(records)))
    order = np.random.default_rng(seed).permutation(len(keys))
    held = {keys[i] for i in order[: int(round(len(keys) * eval_fraction))]}
    key = (lambda i, r: r.prompt) if len(prompts) > 1 else (lambda i, r: i)
    train = [r for i, r in enumerate(records) if key(i, r) not in held]
    held_out = [r for i, r in enumerate(records) if key(i, r) in held]
    return train, held_out


def _device(model: PreTrainedModel) -> torch.device:
    return next(model.parameters()).device


def _rewards(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int
) -> torch.Tensor:
    batch = tokenizer(
        list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    ).to(_device(model))
    return model(**batch).logits[:, 0].float()  # (B,)


@torch.no_grad()
def score_texts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    batch_size: int = 64,
    max_length: int = 128,
) -> np.ndarray:
    """The scalar reward of each text, (N,) float64."""
    scores = [
        _rewards(model, tokenizer, texts[i : i + batch_size], max_length).cpu()
        for i in range(0, len(texts), batch_size)
    ]
    return torch.cat(scores).numpy().astype(np.float64) if scores else np.zeros(0)


def _text(prompt: str, completion: str, include_prompt: bool) -> str:
    # The same text HFRewardModel scores in the environment (lm_gym.rewards._texts), as _record_input says.
    return prompt + completion if include_prompt else completion


def _record_input(model: PreTrainedModel, include_prompt: bool) -> None:
    """Write into the model's config the input it was trained on (:func:`_text`: no EOS, no chat template),
    which ``HFRewardModel`` reads, and ``problem_type="regression"``: transformers' text-classification
    pipeline then returns the raw score instead of its sigmoid (TextClassificationPipeline.postprocess)."""
    fmt = RewardInput(include_prompt=include_prompt, append_eos=False, chat_template=False)
    setattr(model.config, REWARD_INPUT, fmt._asdict())
    model.config.problem_type = "regression"


def evaluate_reward_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[PreferenceRecord],
    *,
    gold: RewardFunction | None = None,
    include_prompt: bool = True,
    confident: float = 0.8,
    batch_size: int = 64,
    max_length: int = 128,
) -> dict[str, float]:
    """Pairwise accuracy of a reward model on ``records``, against their labels and against ``gold``.

    Like Llama 2's accuracy per preference strength (Touvron et al. 2023, Table 8), the accuracy is also
    broken down by how many annotators agreed on the pair (the records' ``agreement``): pairs the panel
    split on are close calls, and nearly a coin flip for any model.

    Args:
        model: the reward model (one output).
        tokenizer: its tokenizer.
        records: the pairs to judge.
        gold: the gold scorer, for the accuracies against gold.
        include_prompt: score ``prompt + completion`` or the completion alone.
        confident: the agreement from which a pair counts as *confident*: the pairs a collection that
            drops the panel's near-ties (``AnnotatorPanel(min_agreement=confident)``) would keep.
        batch_size: texts per forward pass.
        max_length: texts are truncated to this many tokens.

    Returns:
        ``accuracy`` (share of pairs with ``r_chosen > r_rejected``), ``pairs``; with ``gold``:
        ``gold_pairs`` (pairs whose gold scores differ) and, when there are any, ``accuracy_gold`` (share
        of them the model orders as gold does) and ``labels_gold`` (share whose label agrees). When the
        records carry ``agreement``: ``accuracy_confident``, ``confident_pairs`` and, with ``gold``,
        ``gold_pairs_confident``, ``accuracy_gold_confident``, ``labels_gold_confident`` over the pairs with
        ``agreement >= confident``, and ``accuracy_gold/agreement_<a>`` for each agreement level ``a``.
    """
    keys = list(dict.fromkeys((r.prompt, c) for r in records for c in (r.chosen, r.rejected)))
    index = {key: n for n, key in enumerate(keys)}
    texts = [_text(p, c, include_prompt) for p, c in keys]
    scores = score_texts(model, tokenizer, texts, batch_size=batch_size, max_length=max_length)
    chosen = np.array([index[(r.prompt, r.chosen)] for r in records], dtype=np.int64)
    rejected = np.array([index[(r.prompt, r.rejected)] for r in records], dtype=np.int64)
    model_prefers_chosen = scores[chosen] > scores[rejected]
    metrics = {
        "accuracy": float(model_prefers_chosen.mean()) if records else 0.0,
        "pairs": float(len(records)),
    }
    if gold is not None:
        g = np.asarray(gold([p for p, _ in keys], [c for _, c in keys]), dtype=np.float64)
        decided = g[chosen] != g[rejected]
        gold_prefers_chosen = g[chosen] > g[rejected]
        hits = model_prefers_chosen == gold_prefers_chosen
        metrics["gold_pairs"] = float(decided.sum())
        if decided.any():  # no accuracy against gold when it ties every pair
            metrics.update(
                accuracy_gold=float(hits[decided].mean()),
                labels_gold=float(gold_prefers_chosen[decided].mean()),
            )
    agreement = np.array([np.nan if r.agreement is None else r.agreement for r in records], dtype=np.float64)
    if np.isnan(agreement).all():
        return metrics
    sure = agreement >= confident - 1e-9
    metrics.update(
        accuracy_confident=float(model_prefers_chosen[sure].mean()) if sure.any() else 0.0,
        confident_pairs=float(sure.sum()),
    )
    if gold is not None:
        kept = decided & sure
        metrics["gold_pairs_confident"] = float(kept.sum())
        if kept.any():
            metrics.update(
                accuracy_gold_confident=float(hits[kept].mean()),
                labels_gold_confident=float(gold_prefers_chosen[kept].mean()),
            )
        for level in np.unique(agreement[~np.isnan(agreement)]):
            at = decided & np.isclose(agreement, level)
            if at.any():
                metrics[f"accuracy_gold/agreement_{level:.2f}"] = float(hits[at].mean())
    return metrics


# pairs per step when the records share one prompt (HH-RLHF keeps it inside the texts) and batch_size is None
SHARED_PROMPT_BATCH = 32


def _batches(
    records: Sequence[PreferenceRecord], batch_size: int | None, rng: np.random.Generator
) -> list[list[PreferenceRecord]]:
    """Shuffled batches in which the pairs of one prompt stay together (split only across a boundary); with
    ``batch_size=None`` each batch is one prompt's pairs."""
    groups: dict[str, list[PreferenceRecord]] = {}
    for r in records:
        groups.setdefault(r.prompt, []).append(r)
    group_list = list(groups.values())
    if len(group_list) == 1:  # one shared (empty) prompt: plain shuffled pairs
        group_list = [[r] for r in group_list[0]]
        batch_size = batch_size or SHARED_PROMPT_BATCH
    shuffled = [
        [group_list[g][i] for i in rng.permutation(len(group_list[g]))]
        for g in rng.permutation(len(group_list))
    ]
    if batch_size is None:
        return shuffled
    flat = [r for group in shuffled for r in group]
    return [flat[i : i + batch_size] for i in range(0, len(flat), batch_size)]


def _load(model: str | PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, seed: int, device):
    if isinstance(model, str):
        from lm_gym.models import load_sequence_classifier

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # the fresh scalar head's initialisation
            model, loaded = load_sequence_classifier(model, num_labels=1, device=device)
        tokenizer = tokenizer if tokenizer is not None else loaded
    elif tokenizer is None:
        raise ValueError("train_reward_model: pass the tokenizer together with a loaded model")
    elif device is not None:
        model.to(device)
    if model.config.num_labels != 1:
        raise ValueError(
            f"train_reward_model: the model's head has {model.config.num_labels} outputs; a reward model "
            "needs one (load the backbone with num_labels=1)"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def train_reward_model(
    records: Sequence[PreferenceRecord],
    *,
    model: str | PreTrainedModel = "minilm-l6",
    tokenizer: PreTrainedTokenizerBase | None = None,
    epochs: int = 3,
    learning_rate: float = 1e-4,
    batch_size: int | None = None,
    margin: float = 0.0,
    center_coef: float = 0.0,
    eval_fraction: float = 0.1,
    min_agreement: float = 0.0,
    vote_share: bool = True,
    confident: float = 0.8,
    include_prompt: bool = True,
    max_length: int = 128,
    weight_decay: float = 0.01,
    warmup_ratio: float = 0.1,
    max_grad_norm: float = 1.0,
    gold: RewardFunction | None = None,
    out_dir: str | Path | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    keep_checkpoints: int | None = 1,
    max_nonfinite: int = 3,
    log: Callable[[str], Any] | None = print,
) -> RewardModelResult:
    """Fit a scalar reward model to preference records with the Bradley-Terry loss.

    Args:
        records: the preference records (``prompt``, ``chosen``, ``rejected``...).
        model: a backbone name/folder/Hub id (``"minilm-l6"`` by default) that gets a fresh one-output
            head, or a loaded sequence classifier with ``num_labels=1``.
        tokenizer: required with a loaded model.
        epochs: passes over the training pairs.
        learning_rate: AdamW's peak learning rate (linear warm-up, then linear decay to 0).
        batch_size: pairs per optimizer step; None (the default): one prompt's pairs per step, i.e. the
            K(K-1)/2 comparisons of one ranking of K completions (InstructGPT's batching, which takes all of
            a prompt's comparisons as one element; its K distinct texts are run once each).
        margin: margin of the records that have none of their own (0 = plain Bradley-Terry).
        center_coef: coefficient of the reward-centering term (0 = off; 0.01 in Eisenstein et al. 2023).
        eval_fraction: share of the prompts held out for evaluation.
        min_agreement: train only on pairs whose annotator ``agreement`` is at least this (pairs without
            one are kept); the held-out pairs are never filtered.
        vote_share: fit the annotators' vote share (the records' ``agreement``; 1 when a record has none)
            instead of a hard label: the likelihood of every annotator's vote (see
            :func:`bradley_terry_loss`).
        confident: held-out pairs with at least this annotator agreement are also scored apart
            (``eval/accuracy_gold_confident``; see :func:`evaluate_reward_model`).
        include_prompt: score ``prompt + completion`` or the completion alone; recorded in the returned
            model's config (``lm_gym_reward_input``, see :func:`save_reward_model`), which ``HFRewardModel``
            follows.
        max_length: texts are truncated to this many tokens.
        weight_decay: AdamW weight decay.
        warmup_ratio: share of the steps spent warming the learning rate up.
        max_grad_norm: gradient-norm clipping (0 = off).
        gold: a gold scorer ``(prompts, completions) -> scores`` for ``eval/accuracy_gold`` (e.g. VADER).
        out_dir: save the model, tokenizer and ``reward_model.json`` there (see :func:`save_reward_model`).
        seed: seeds the head's initialisation, the split and the batch order.
        device: where to train; default the model's device (a name is loaded on CUDA when available).
        checkpoint_dir: write a checkpoint there at the end of every epoch (None = no checkpoints).
        resume: continue from the latest checkpoint in ``checkpoint_dir`` (the same records, backbone and
            settings; other settings are refused).
        keep_checkpoints: how many of the latest checkpoints to keep (None = all).
        max_nonfinite: consecutive steps with a non-finite loss or gradient (skipped, the weights untouched)
            before the run stops.
        log: where progress lines go (None: silent).

    Raises:
        NonFiniteLossError: ``max_nonfinite`` consecutive steps had a non-finite loss or gradient, or the last
            step had (the model's scores are not finite); nothing is saved to ``out_dir``.
    """
    if epochs < 1 or (batch_size is not None and batch_size < 1):
        raise ValueError(
            f"train_reward_model: epochs and batch_size must be >= 1 (batch_size None: one prompt's pairs); "
            f"got {epochs}, {batch_size}"
        )
    if not 0 < learning_rate < math.inf:
        raise ValueError(
            f"train_reward_model: learning_rate must be a finite number > 0; got {learning_rate}"
        )
    if not math.isfinite(margin):
        raise ValueError(f"train_reward_model: margin must be a finite number; got {margin}")
    if center_coef < 0 or not 0.0 <= warmup_ratio < 1.0:
        raise ValueError(
            f"train_reward_model: center_coef must be >= 0 and warmup_ratio in [0, 1); got {center_coef}, "
            f"{warmup_ratio}"
        )
    start = time.perf_counter()
    base = model if isinstance(model, str) else model.name_or_path
    settings = dict(
        epochs=epochs,
        learning_rate=learning_rate,
        batch_size=batch_size,
        margin=margin,
        center_coef=center_coef,
        eval_fraction=eval_fraction,
        min_agreement=min_agreement,
        vote_share=vote_share,
        confident=confident,
        max_length=max_length,
        weight_decay=weight_decay,
        warmup_ratio=warmup_ratio,
        max_grad_norm=max_grad_norm,
        seed=seed,
    )
    run_settings = {"base_model": base, **settings, "include_prompt": include_prompt}
    run_settings["data"] = data_digest([r.to_json() for r in records])  # a resume on other data is refused
    checkpoint = state = None
    if resume:
        checkpoint, state = Trainer.resume_point(checkpoint_dir, run_settings, "train_reward_model")
    train_records, held_out = split_by_prompt(records, eval_fraction, seed)
    train_records = [r for r in train_records if r.agreement is None or r.agreement >= min_agreement]
    if not train_records:
        raise ValueError(
            f"train_reward_model: no training pairs left out of {len(records)} records "
            f"(eval_fraction={eval_fraction}, min_agreement={min_agreement})"
        )
    model, tokenizer = _load(model, tokenizer, seed, device)
    group = ProcessGroup(_device(model))  # alone: every collective is the identity
    params = [p for p in model.parameters() if p.requires_grad]
    group.broadcast_parameters(params)  # the same starting weights (the fresh head's too) in every process
    log = log if group.is_main_process else None
    # Dropout off (eval mode) during training too, as TRL does for reward models: the pair difference
    # r_c - r_r should not be the difference of two independently dropped-out networks.
    model.eval()
    rng = np.random.default_rng(seed)
    steps = epochs * len(_batches(train_records, batch_size, np.random.default_rng(0)))
    trainer = Trainer(
        params,
        group,
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        max_grad_norm=max_grad_norm if max_grad_norm > 0 else math.inf,
        lr_schedule="linear",
        warmup_steps=int(steps * warmup_ratio),
        max_nonfinite=max_nonfinite,
        unit="step",
        hint="check the learning rate and the margins",
    )
    guard, weights, step = trainer.guard, dict(model.named_parameters()), 0
    evaluate = dict(gold=gold, include_prompt=include_prompt, confident=confident, max_length=max_length)
    history: list[dict[str, float]] = []
    first_epoch = 1
    if checkpoint is not None:
        trainer.load(checkpoint, weights)
        rng.bit_generator.state = state["batch_order_rng"]
        history, first_epoch = state["history"], state["epoch"] + 1
        step = state["epoch"] * (steps // epochs)  # every epoch has the same number of batches
        start = time.perf_counter() - state["elapsed"]
        if log is not None:
            log(f"resumed from {checkpoint} (epoch {state['epoch']} of {epochs})")
    for epoch in range(first_epoch, epochs + 1):
        losses, hits, seen = [], 0, 0
        for global_batch in _batches(train_records, batch_size, rng):
            # this process's contiguous share of the pairs (a process left without one runs a pair at weight
            # 0); the loss is a mean over pairs: weighted by the share's size, times the number of processes
            # since their gradients are averaged, the mean gradient is the global batch's
            share = group.shard(global_batch)
            batch = share or global_batch[:1]
            weight = len(share) * group.world_size / len(global_batch)
            keys = list(dict.fromkeys((r.prompt, c) for r in batch for c in (r.chosen, r.rejected)))
            index = {key: n for n, key in enumerate(keys)}
            rewards = _rewards(
                model, tokenizer, [_text(p, c, include_prompt) for p, c in keys], max_length
            )  # (U,)
            device_ = rewards.device
            r_chosen = rewards[
                torch.tensor([index[(r.prompt, r.chosen)] for r in batch], device=device_)
            ]  # (P,)
            r_rejected = rewards[torch.tensor([index[(r.prompt, r.rejected)] for r in batch], device=device_)]
            margins = torch.tensor(
                [r.margin if r.margin is not None else margin for r in batch], device=device_
            )  # (P,)
            targets = None
            if vote_share:
                shares = [r.agreement if r.agreement is not None else 1.0 for r in batch]
                targets = torch.tensor(shares, device=device_)  # (P,)
            loss = bradley_terry_loss(r_chosen, r_rejected, margins, center_coef, targets)
            trainer.set_learning_rate(step, steps)
            finite = bool(torch.isfinite(loss))
            if finite:
                (loss * weight).backward()
            grad_norm = trainer.step(finite)
            step += 1
            if guard.end_round(int(grad_norm is None), f"epoch {epoch}, step {len(losses) + 1}"):
                raise guard.error("the weights hold the last finite update; the reward model was not saved")
            losses.append(loss.item() * weight / group.world_size)  # this share's part of the batch's mean
            hits += int((r_chosen > r_rejected).sum()) if share else 0
            seen += len(global_batch)
        total, hits = group.sum([float(np.sum(losses)), hits])  # over the processes' shares
        row = {
            "epoch": float(epoch),
            "train/loss": float(total / len(losses)),
            "train/accuracy": float(hits / seen),
        }
        if held_out:
            row.update(
                {
                    f"eval/{k}": v
                    for k, v in evaluate_reward_model(model, tokenizer, held_out, **evaluate).items()
                }
            )
        row["time/elapsed_s"] = time.perf_counter() - start
        history.append(row)
        if log is not None:
            log(" ".join(f"{k} {v:.4g}" for k, v in row.items() if "/agreement_" not in k))
        if checkpoint_dir is not None:
            progress = dict(
                epoch=epoch,
                history=history,
                batch_order_rng=rng.bit_generator.state,
                elapsed=time.perf_counter() - start,
                settings=run_settings,
            )
            trainer.save(checkpoint_dir, f"epoch_{epoch:06d}", weights, progress, keep_checkpoints)
    if guard.streak:  # the last step's loss was not finite: so are the model's scores
        raise guard.error("the weights hold the last finite update; the reward model was not saved")
    metrics = {
        **history[-1],
        "data/train_pairs": float(len(train_records)),
        "data/eval_pairs": float(len(held_out)),
    }
    _record_input(model, include_prompt)
    result = RewardModelResult(model, tokenizer, metrics, history)
    if out_dir is not None and group.is_main_process:
        save_reward_model(
            result, out_dir, include_prompt=include_prompt, settings={"base_model": base, **settings}
        )
    group.barrier()  # every process returns with the folder complete
    return result


def save_reward_model(
    result: RewardModelResult,
    out_dir: str | Path,
    *,
    include_prompt: bool | None = None,
    settings: dict | None = None,
) -> Path:
    """Save the model (safetensors) and tokenizer with ``save_pretrained``, and ``reward_model.json``.

    The model's config (so ``config.json``) is given the input format the model was trained on,
    ``lm_gym_reward_input`` (``include_prompt``, no EOS, no chat template; see
    :class:`lm_gym.rewards.RewardInput`), and ``problem_type="regression"``, so that transformers' text
    classification pipeline returns its raw score. ``reward_model.json`` holds ``include_prompt`` too (for
    lm-gym versions that read only this file), the training ``settings``, the final ``metrics`` and the
    per-epoch ``history``.

    Args:
        result: what :func:`train_reward_model` returned.
        out_dir: the folder to write (created if needed).
        include_prompt: whether the model was trained on ``prompt + completion`` (True) or the completion
            alone; None: what :func:`train_reward_model` recorded in the model's config, else True.
        settings: the training settings to record.
    """
    if include_prompt is None:
        include_prompt = getattr(result.model.config, REWARD_INPUT, {}).get("include_prompt", True)
    out = Path(out_dir)
    check_finite(result.model.named_parameters(), f"reward model {out}")
    out.mkdir(parents=True, exist_ok=True)
    _record_input(result.model, include_prompt)
    result.model.save_pretrained(out, safe_serialization=True)
    result.tokenizer.save_pretrained(out)
    info = {
        "include_prompt": include_prompt,
        "settings": settings or {},
        "metrics": result.metrics,
        "history": result.history,
    }
    (out / REWARD_MODEL_INFO).write_text(json.dumps(info, indent=2, default=str) + "\n")
    return out


def accuracy_report(metrics: dict[str, float], prefix: str = "eval/") -> str:
    """The held-out accuracies of :func:`train_reward_model`'s metrics, in words (one line each)."""
    m = {k[len(prefix) :]: v for k, v in metrics.items() if k.startswith(prefix)}
    if "accuracy" not in m:
        return "no held-out pairs (eval_fraction=0)"
    lines = [f"held-out accuracy against the labels: {m['accuracy']:.3f} ({int(m['pairs'])} pairs)"]
    if "accuracy_gold" in m:
        lines.append(
            f"held-out accuracy against the gold scorer: {m['accuracy_gold']:.3f} ({int(m['gold_pairs'])} pairs "
            f"whose gold scores differ; the labels themselves agree with gold on {m['labels_gold']:.3f})"
        )
    elif "gold_pairs" in m:
        lines.append("the gold scorer ties every held-out pair: no accuracy against it")
    if "accuracy_gold_confident" in m:
        levels = ", ".join(
            f"{float(k.split('_')[-1]):.2f}: {v:.3f}" for k, v in m.items() if k.startswith("accuracy_gold/")
        )
        lines.append(
            f"  on the {int(m['gold_pairs_confident'])} pairs the panel agrees on (its near-ties dropped): "
            f"{m['accuracy_gold_confident']:.3f}; by annotator agreement {levels}"
        )
    return "\n".join(lines)
