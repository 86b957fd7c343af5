"""Supervised fine-tuning (SFT) on demonstrations: step 1 of RLHF.

InstructGPT (Ouyang et al. 2022, §3.5 "Supervised fine-tuning") fine-tunes the pretrained LM on human
demonstrations with the plain next-token cross-entropy before any RL; the result is both the starting
policy and the KL reference of the RL step. A demonstration is either a whole text (every token is a
target) or a prompt and its completion, where only the completion's tokens are targets: the prompt is
given, not learned (TRL's ``completion_only_loss``). The prompt is tokenized exactly as
``TextGenVectorEnv`` tokenizes prompts (with the tokenizer's special tokens), the completion is appended
verbatim (so it carries its own leading space), then the EOS token, which is the env's stop token: the
fine-tuned model learns where a completion ends.

Under ``accelerate launch``/``torchrun`` (data parallel, :mod:`algorithms.common.distributed`) every process forms the
same global batches (the same seed) and runs its contiguous share of each; the loss is weighted by the global
batch's target-token count and the gradients are averaged, so N processes take the step one process takes
on the whole batch. Only the main process prints and writes the model folder.

With a ``checkpoint_dir`` the main process writes a checkpoint at the end of every epoch (weights, optimizer
state, the step count, the shuffling generator, every process's torch RNG state and the history; the trainer
skeleton's, :mod:`algorithms.common.trainer`); ``learn(..., resume=True)`` continues from the latest one and, on CPU, ends with
the weights and metrics of the uninterrupted run.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from huggingface_hub import is_offline_mode
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from algorithms.common.distributed import ProcessGroup
from algorithms.common.lora import add_lora
from algorithms.common.nonfinite import check_finite
from algorithms.common.trainer import Trainer, check_arg, data_digest
from lm_gym.preferences.data import is_local_path

__all__ = [
    "IGNORE_INDEX",
    "SENTIMENT_DEMOS",
    "SFT",
    "Batch",
    "Demonstration",
    "Example",
    "SFTResult",
    "collate",
    "load_demonstrations",
    "tokenize_demonstrations",
]

IGNORE_INDEX = -100  # the label that cross-entropy skips (PyTorch's and transformers' convention)
LOADERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
COMPLETION_FIELDS = ("completion", "response")
SENTIMENT_DEMOS = str(resources.files("lm_gym.tasks").joinpath("data/sentiment_demos.jsonl"))
"""150 positive continuations of the sentiment task's train prompts, ``{"prompt", "completion"}`` per line."""


class Demonstration(NamedTuple):
    """One demonstration. ``prompt`` is ``""`` for a whole text, whose every token is then a target."""

    prompt: str
    completion: str


class Example(NamedTuple):
    """A tokenized demonstration: ``labels`` is ``input_ids`` with the prompt tokens set to -100."""

    input_ids: list[int]
    labels: list[int]


class Batch(NamedTuple):
    """Right-padded examples; padding has attention 0 and label -100."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T)


class SFTResult(NamedTuple):
    """Final metrics (``train/...``, ``eval/...``, ``time/...``) and one record per epoch."""

    metrics: dict[str, float]
    history: list[dict[str, float]]


# ---------------------------------------------------------------------------------------------- data
def load_demonstrations(
    source: str | Path | Sequence[Mapping[str, Any]] | Any,
    *,
    text_field: str = "text",
    prompt_field: str = "prompt",
    completion_field: str | None = None,
    split: str = "train",
) -> list[Demonstration]:
    """Read demonstrations from a file, a folder, a Hub dataset, a ``datasets.Dataset`` or a list of dicts.

    A file is read with ``datasets.load_dataset`` by its suffix: ``.jsonl``/``.json`` (one record per
    line or a JSON array), ``.csv`` or ``.parquet``. Any other string is a Hub dataset name (needs the
    network). Records with the prompt and a completion field are prompt/completion demonstrations;
    otherwise records need the text field.

    Args:
        source: the data.
        text_field: field of a whole-text demonstration.
        prompt_field: field of the prompt.
        completion_field: field of the completion; None accepts ``completion`` or ``response``.
        split: the split of a Hub dataset or folder.

    Raises:
        ValueError: a record lacks the fields, a value is not a string, or there are no records.
        FileNotFoundError: a path that does not exist, or a Hub name while offline.
    """
    name = str(source) if isinstance(source, (str, Path)) else type(source).__name__
    records = _read(source, split) if isinstance(source, (str, Path)) else source
    if len(records) == 0:
        raise ValueError(f"data {name}: no records")
    fields = set(getattr(records, "column_names", None) or records[0].keys())
    completions = (completion_field,) if completion_field else COMPLETION_FIELDS
    completion = next((f for f in completions if f in fields), None)
    if prompt_field in fields and completion is not None:
        columns = (prompt_field, completion)
    elif text_field in fields:
        columns = (text_field,)
    else:
        wanted = " or ".join(repr(f) for f in completions)
        raise ValueError(
            f"data {name}: records need a {text_field!r} field, or {prompt_field!r} and {wanted} fields; "
            f"found fields {sorted(fields)}"
        )
    demos = []
    for i, record in enumerate(records):
        values = [record.get(c) for c in columns]
        for column, value in zip(columns, values):
            if not isinstance(value, str):
                raise ValueError(f"data {name}, record {i}: field {column!r} must be a string; got {value!r}")
        demos.append(Demonstration(*values) if len(values) == 2 else Demonstration("", values[0]))
    return demos


def _read(source: str | Path, split: str) -> Any:
    from datasets import load_dataset

    path = Path(source).expanduser()
    if path.is_file():
        builder = LOADERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(f"data {source}: unknown file type {path.suffix!r}; use {', '.join(LOADERS)}")
        return load_dataset(builder, data_files=str(path), split="train")
    if path.is_dir():
        return load_dataset(str(path), split=split)
    if is_local_path(source):
        raise FileNotFoundError(
            f"data {source}: no such file or folder (a Hub data set is named 'owner/name')"
        )
    if is_offline_mode():
        raise FileNotFoundError(
            f"data {source!r}: no such file, and Hub datasets cannot be loaded offline (HF_HUB_OFFLINE)"
        )
    return load_dataset(str(source), split=split)


def tokenize_demonstrations(
    demos: Sequence[Demonstration],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    append_eos: bool = True,
) -> tuple[list[Example], int]:
    """Tokenize; return the examples and how many were dropped for having no target token left.

    The sequence is prompt (with the tokenizer's special tokens, as the env encodes prompts), then the
    completion, then EOS, cut to ``max_length`` from the right. Prompt labels are ``IGNORE_INDEX``.
    """
    if not demos:
        return [], 0
    prompts = tokenizer([d.prompt for d in demos], add_special_tokens=True)["input_ids"]
    completions = tokenizer([d.completion for d in demos], add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if append_eos and tokenizer.eos_token_id is not None else []
    examples, dropped = [], 0
    for prompt, completion in zip(prompts, completions):
        input_ids = (prompt + completion + eos)[:max_length]
        labels = ([IGNORE_INDEX] * len(prompt) + completion + eos)[:max_length]
        # labels[0] is never predicted: there is no token before it
        if all(label == IGNORE_INDEX for label in labels[1:]):
            dropped += 1
            continue
        examples.append(Example(input_ids, labels))
    return examples, dropped


def collate(examples: Sequence[Example], pad_token_id: int, device: torch.device | str = "cpu") -> Batch:
    """Right-pad a list of examples into one batch."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)  # (B, T)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention_mask[row, :n] = 1
    return Batch(input_ids.to(device), attention_mask.to(device), labels.to(device))


def _nll(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
    """Summed negative log-likelihood of the target tokens, and their number."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # (B, T, V)
    targets = batch.labels[:, 1:]  # (B, T-1): token t+1 is predicted from the tokens up to t
    nll = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return nll, int((targets != IGNORE_INDEX).sum())


# ---------------------------------------------------------------------------------------------- training
class SFT:
    """Supervised fine-tuning of a causal LM on demonstrations, the first step of RLHF.

    The loss is the mean cross-entropy of the target tokens (a completion's, or a whole text's), with
    AdamW, an optional linear warmup and linear decay, and gradient clipping. Defaults follow
    ``transformers.Trainer`` (3 epochs, batch 8, linear decay, clip 1.0) and TRL's SFT (learning rate
    2e-5). On CPU a run repeats exactly for a given ``seed``; the global RNG is left untouched. Under a
    data-parallel launcher each process takes its share of every batch (see the module's docstring).

    Example, on the shipped sentiment demonstrations (:data:`SENTIMENT_DEMOS`), then RL from the result::

        lm-gym sft --model smollm2-135m --output-dir runs/sft     # --data defaults to the demos
        lm-gym train --model runs/sft --task sentiment

    or in Python::

        model, tokenizer = load_causal_lm("smollm2-135m")
        trainer = SFT(model, tokenizer, epochs=1, learning_rate=5e-5, eval_fraction=0.1)
        result = trainer.learn(load_demonstrations(SENTIMENT_DEMOS))
        trainer.save_pretrained("runs/sft")  # load_causal_lm("runs/sft") loads it

    Args:
        model: the causal LM, trained in place (with LoRA, the adapters are merged into it at the end).
        tokenizer: its tokenizer.
        epochs: passes over the training demonstrations.
        batch_size: demonstrations per optimizer step.
        learning_rate: AdamW learning rate (the peak, after warmup).
        lr_schedule: ``"linear"`` (decay to 0 at the last step) or ``"constant"``.
        warmup_ratio: share of the steps over which the learning rate rises linearly from 0.
        weight_decay: AdamW weight decay.
        max_grad_norm: clip the gradient's global norm to this (0 = no clipping).
        max_length: tokens per demonstration (prompt, completion and EOS), cut from the right.
        max_steps: stop after this many optimizer steps (None = run every epoch).
        eval_fraction: share of the demonstrations held out for the eval loss (0 = none).
        append_eos: end every target with the EOS token, so the model learns where a completion stops.
        lora_r: LoRA rank; 0 trains every weight.
        lora_alpha: LoRA scaling numerator (``alpha / r`` scales the update).
        lora_target_modules: modules that get adapters (``"all-linear"`` by default).
        seed: seeds the held-out split, the shuffling, dropout and the LoRA initialisation.
        verbose: 1 prints one line per epoch, 0 nothing.
        checkpoint_dir: write a checkpoint there at the end of every epoch, to resume from with
            ``learn(..., resume=True)`` (None = no checkpoints).
        keep_checkpoints: how many of the latest checkpoints to keep (None = all).
        max_nonfinite: consecutive optimizer steps with a non-finite loss or gradient (skipped, the weights
            untouched) before the run stops with an error.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        epochs: int = 3,
        batch_size: int = 8,
        learning_rate: float = 2e-5,
        lr_schedule: str = "linear",
        warmup_ratio: float = 0.0,
        weight_decay: float = 0.0,
        max_grad_norm: float = 1.0,
        max_length: int = 512,
        max_steps: int | None = None,
        eval_fraction: float = 0.0,
        append_eos: bool = True,
        lora_r: int = 0,
        lora_alpha: int = 32,
        lora_target_modules: str | list[str] = "all-linear",
        seed: int = 0,
        verbose: int = 1,
        checkpoint_dir: str | Path | None = None,
        keep_checkpoints: int | None = 1,
        max_nonfinite: int = 3,
    ) -> None:
        integer = "an integer >= 1"
        check_arg("epochs", epochs, lambda v: int(v) == v and v >= 1, integer)
        check_arg("batch_size", batch_size, lambda v: int(v) == v and v >= 1, integer)
        check_arg("learning_rate", learning_rate, lambda v: v > 0, "> 0")
        check_arg("lr_schedule", lr_schedule, lambda v: v in ("linear", "constant"), "'linear' or 'constant'")
        check_arg("warmup_ratio", warmup_ratio, lambda v: 0 <= v < 1, "in [0, 1)")
        check_arg("weight_decay", weight_decay, lambda v: v >= 0, ">= 0")
        check_arg("max_grad_norm", max_grad_norm, lambda v: v >= 0, ">= 0 (0 = no clipping)")
        check_arg("max_length", max_length, lambda v: int(v) == v and v >= 2, "an integer >= 2")
        check_arg(
            "max_steps", max_steps, lambda v: v is None or (int(v) == v and v >= 1), f"None or {integer}"
        )
        check_arg("eval_fraction", eval_fraction, lambda v: 0 <= v < 1, "in [0, 1)")
        check_arg(
            "lora_r", lora_r, lambda v: int(v) == v and v >= 0, "an integer >= 0 (0 = full fine-tuning)"
        )
        check_arg("lora_alpha", lora_alpha, lambda v: v > 0, "> 0")
        check_arg(
            "keep_checkpoints",
            keep_checkpoints,
            lambda v: v is None or (int(v) == v and v >= 1),
            "None or >= 1",
        )
        check_arg("max_nonfinite", max_nonfinite, lambda v: int(v) == v and v >= 1, integer)
        self.model, self.tokenizer = model, tokenizer
        self.epochs, self.batch_size, self.learning_rate = epochs, batch_size, learning_rate
        self.lr_schedule, self.warmup_ratio, self.weight_decay = lr_schedule, warmup_ratio, weight_decay
        self.max_grad_norm, self.max_length, self.max_steps = max_grad_norm, max_length, max_steps
        self.eval_fraction, self.append_eos = eval_fraction, append_eos
        self.lora_r, self.lora_alpha, self.lora_target_modules = lora_r, lora_alpha, lora_target_modules
        self.seed, self.verbose = seed, verbose
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.keep_checkpoints, self.max_nonfinite = keep_checkpoints, int(max_nonfinite)
        self.result: SFTResult | None = None
        self.process_group = ProcessGroup(self.device)  # alone: every collective is the identity

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else (self.tokenizer.eos_token_id or 0)  # padding is masked anyway

    def tokenize(self, demos: Sequence[Demonstration]) -> list[Example]:
        """Tokenize with this trainer's ``max_length`` and ``append_eos``; warn about dropped ones."""
        examples, dropped = tokenize_demonstrations(
            demos, self.tokenizer, max_length=self.max_length, append_eos=self.append_eos
        )
        if dropped:
            warnings.warn(
                f"{dropped} demonstrations have no completion token within max_length={self.max_length}; "
                "dropped",
                stacklevel=3,
            )
        return examples

    def split(self, demos: Sequence[Demonstration]) -> tuple[list[Demonstration], list[Demonstration]]:
        """(train, held-out): a seeded shuffle-and-cut by ``eval_fraction``, the same on every machine."""
        if self.eval_fraction == 0:
            return list(demos), []
        n_eval = max(1, round(len(demos) * self.eval_fraction))
        if n_eval >= len(demos):
            raise ValueError(
                f"eval_fraction={self.eval_fraction} leaves no training demonstrations out of {len(demos)}"
            )
        order = np.random.default_rng(self.seed).permutation(len(demos))
        held_out = set(order[:n_eval].tolist())
        return (
            [d for i, d in enumerate(demos) if i not in held_out],
            [d for i, d in enumerate(demos) if i in held_out],
        )

    @torch.no_grad()
    def evaluate_loss(self, examples: Sequence[Example], model: torch.nn.Module | None = None) -> float:
        """Mean cross-entropy per target token (nats) over ``examples``; its exp is the perplexity.

        With several processes each scores its share and the sums are reduced (every process must call it).
        """
        model = self.model if model is None else model
        was_training = model.training
        model.eval()
        total, tokens = 0.0, 0
        mine = self.process_group.shard(examples)
        for start in range(0, len(mine), self.batch_size):
            nll, n = _nll(
                model, collate(mine[start : start + self.batch_size], self.pad_token_id, self.device)
            )
            total, tokens = total + nll.item(), tokens + n
        model.train(was_training)
        total, tokens = self.process_group.sum([total, tokens])
        return float(total / tokens)

    def learn(
        self,
        data: str | Path | Sequence[Demonstration] | Sequence[Mapping[str, Any]] | Any,
        eval_data: str | Path | Sequence[Demonstration] | Sequence[Mapping[str, Any]] | Any = None,
        resume: bool = False,
    ) -> SFTResult:
        """Fine-tune on ``data``; report the held-out loss before and after.

        Args:
            data: demonstrations, or anything :func:`load_demonstrations` reads (default field names).
            eval_data: held-out demonstrations; None holds out ``eval_fraction`` of ``data``.
            resume: continue from the latest checkpoint in ``checkpoint_dir`` (a fresh copy of the same
                initial model, the same settings and data); a run with other settings is refused.

        Raises:
            NonFiniteLossError: ``max_nonfinite`` consecutive steps had a non-finite loss or gradient, or the
                last step had: the model's own outputs are not finite (the weights hold the last finite
                update).
        """
        start_time = time.perf_counter()
        demos = data if _is_demos(data) else load_demonstrations(data)
        if eval_data is None:
            train_demos, eval_demos = self.split(demos)
        else:
            train_demos = list(demos)
            eval_demos = eval_data if _is_demos(eval_data) else load_demonstrations(eval_data)
        train, held_out = self.tokenize(train_demos), self.tokenize(eval_demos)
        if not train:
            raise ValueError("no training demonstration has a target token within max_length")
        steps_per_epoch = math.ceil(len(train) / self.batch_size)
        total_steps = self.epochs * steps_per_epoch
        if self.max_steps is not None:
            total_steps = min(total_steps, self.max_steps)
        settings = self._run_settings(train, held_out)
        checkpoint, state = (
            Trainer.resume_point(self.checkpoint_dir, settings, "SFT") if resume else (None, None)
        )
        metrics: dict[str, float] = {"train/examples": len(train), "eval/examples": len(held_out)}
        if state is not None:  # the initial model's held-out loss, measured before the crash
            metrics.update(state["metrics"])
        elif held_out:
            metrics["eval/loss_initial"] = self.evaluate_loss(held_out)
            metrics["eval/perplexity_initial"] = math.exp(metrics["eval/loss_initial"])
        history: list[dict[str, float]] = []
        group = self.process_group
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)  # dropout and the LoRA initialisation
            model = self._trainable_model()
            params = [p for p in model.parameters() if p.requires_grad]
            group.broadcast_parameters(params)  # the same starting weights (LoRA's too) in every process
            if group.rank:  # dropout: each process's own stream (the main process keeps the single one's)
                torch.manual_seed(self.seed + 1_000_003 * group.rank)
            trainer = Trainer(
                params,
                group,
                learning_rate=self.learning_rate,
                weight_decay=self.weight_decay,
                max_grad_norm=self.max_grad_norm if self.max_grad_norm > 0 else math.inf,
                lr_schedule=self.lr_schedule,
                warmup_steps=round(self.warmup_ratio * total_steps),
                max_nonfinite=self.max_nonfinite,
                unit="step",
                hint="check the learning rate",
            )
            guard = trainer.guard
            weights = {k: p for k, p in model.named_parameters() if p.requires_grad}
            generator = torch.Generator().manual_seed(self.seed)
            step = 0
            if checkpoint is not None:
                trainer.load(checkpoint, weights)
                generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
                step, history = state["step"], state["history"]
                start_time = time.perf_counter() - state["elapsed"]
                if self.verbose and group.is_main_process:
                    print(f"resumed from {checkpoint} (step {step} of {total_steps})", flush=True)
            model.train()
            while step < total_steps:
                order = torch.randperm(len(train), generator=generator).tolist()
                epoch_nll, epoch_tokens, grad_norms = 0.0, 0, []
                for first in range(0, len(train), self.batch_size):
                    examples = [train[i] for i in order[first : first + self.batch_size]]
                    n_tokens = _target_count(examples)  # of the global batch, whichever process holds them
                    mine = group.shard(examples)  # this process's share (all of it alone)
                    trainer.set_learning_rate(step, total_steps)
                    nll, finite = torch.zeros(()), True
                    if mine:
                        nll, _ = _nll(model, collate(mine, self.pad_token_id, self.device))
                        # the mean over the batch's target tokens, as transformers does; x world_size since
                        # the processes' gradients are averaged: their sum is the global batch's gradient
                        loss = nll * group.world_size / n_tokens
                        finite = bool(torch.isfinite(loss))
                        if finite:
                            loss.backward()
                    # a process with an empty share adds zeros to the average
                    grad_norm = trainer.step(finite)
                    step += 1
                    if grad_norm is not None:
                        grad_norms.append(float(grad_norm))
                    epoch_nll, epoch_tokens = epoch_nll + nll.item(), epoch_tokens + n_tokens
                    if guard.end_round(int(grad_norm is None), f"step {step}"):
                        raise guard.error("the weights hold the last finite update")
                    if step == total_steps:
                        break
                (epoch_nll,) = group.sum([epoch_nll])
                record = {
                    "epoch": step / steps_per_epoch,
                    "train/loss": float(epoch_nll / epoch_tokens),
                    "train/grad_norm": float(np.mean(grad_norms)) if grad_norms else math.nan,
                    "train/learning_rate": trainer.learning_rate_at(step, total_steps),  # the next step's
                    "time/elapsed": time.perf_counter() - start_time,
                }
                if held_out:
                    record["eval/loss"] = self.evaluate_loss(held_out, model)
                    record["eval/perplexity"] = math.exp(record["eval/loss"])
                history.append(record)
                if self.verbose and group.is_main_process:
                    print(" ".join(f"{k} {v:.4g}" for k, v in record.items()), flush=True)
                if self.checkpoint_dir is not None:
                    state = {
                        "step": step,
                        "history": history,
                        "metrics": {k: v for k, v in metrics.items() if k.endswith("_initial")},
                        "elapsed": time.perf_counter() - start_time,
                        "generator": generator.get_state().tolist(),
                        "settings": settings,
                    }
                    trainer.save(
                        self.checkpoint_dir, f"step_{step:06d}", weights, state, self.keep_checkpoints
                    )
        if guard.streak:  # the last step's loss was not finite: so are the model's outputs
            raise guard.error("the weights hold the last finite update")
        if self.lora_r > 0:
            model = model.merge_and_unload()  # a plain transformers model again: no peft needed to load it
        self.model = model.eval()
        metrics.update({k: v for k, v in history[-1].items() if k.startswith(("train/", "eval/"))})
        metrics.update({"train/steps": step, "time/seconds": time.perf_counter() - start_time})
        self.result = SFTResult(metrics, history)
        return self.result

    # ------------------------------------------------------------------------------------------ checkpoints
    def _run_settings(self, train: Sequence[Example], held_out: Sequence[Example]) -> dict[str, Any]:
        """What decides the run's course: a resume with other values is refused."""
        skip = {
            "model",
            "tokenizer",
            "result",
            "process_group",
            "verbose",
            "checkpoint_dir",
            "keep_checkpoints",
            "max_nonfinite",
        }
        settings = {k: v for k, v in vars(self).items() if k not in skip}
        settings["model"] = getattr(self.model, "name_or_path", None)
        # the tokenized demonstrations, held-out ones included
        settings["data"] = data_digest([[tuple(e) for e in train], [tuple(e) for e in held_out]])
        return settings

    def _trainable_model(self) -> torch.nn.Module:
        return add_lora(self.model, self.lora_r, self.lora_alpha, self.lora_target_modules)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write a ``transformers`` folder (safetensors) with the tokenizer and ``sft_metrics.json``.

        ``load_causal_lm(directory)`` loads it, and ``lm-gym train --model DIRECTORY`` starts RL from it.
        With several processes the main one writes while the others wait (every process must call it).
        """
        directory = Path(directory)
        if self.process_group.is_main_process:
            check_finite(self.model.named_parameters(), f"model {directory}")
            directory.mkdir(parents=True, exist_ok=True)
            self.model.save_pretrained(directory, safe_serialization=True)
            self.tokenizer.save_pretrained(directory)
            if self.result is not None:
                skip = ("model", "tokenizer", "result", "process_group")
                settings = {k: v for k, v in vars(self).items() if k not in skip}
                report = {
                    "settings": settings,
                    "metrics": self.result.metrics,
                    "history": self.result.history,
                }
                (directory / "sft_metrics.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        self.process_group.barrier()  # every process returns with the folder complete
        return directory


def _target_count(examples: Sequence[Example]) -> int:
    """The target tokens of ``examples``, as :func:`_nll` counts them (a first label is never a target)."""
    return sum(label != IGNORE_INDEX for e in examples for label in e.labels[1:])


def _is_demos(data: Any) -> bool:
    return (
        isinstance(data, Sequence)
        and not isinstance(data, str)
        and all(isinstance(d, Demonstration) for d in data)
    )
