"""The trainer skeleton that every training loop here shares: the RL core, SFT and the reward model.

What the three loops have in common lives here once; each loop keeps only what differs (its data, its loss,
what a round is: an RL iteration, an SFT or reward-model epoch):

* **the optimizer**: AdamW over float32 master copies of the low-precision parameters
  (:mod:`algorithms.common.precision`), so a bf16 model trains the same way in every loop;
* **the learning-rate schedule**: constant or linear decay to 0, after an optional linear warm-up
  (:func:`schedule_factor`), set from the step count before every step, so a resumed run needs no
  scheduler state;
* **a step**: the gradients averaged over the data-parallel processes, clipped, and applied only when the
  loss and the gradient are finite, in every process at once (:mod:`algorithms.common.nonfinite`);
* **the non-finite guard**: rounds that skipped an update in a row stop the run after ``max_nonfinite``;
* **checkpoints**: the trainable weights (their float32 master values), the optimizer's state, the loop's
  own counters and every process's RNG state, written atomically by the main process
  (:mod:`algorithms.common.checkpoints`); a resume restores them all, and :meth:`Trainer.resume_point`
  refuses a run with other settings;
* **data-parallel sharding**: :attr:`Trainer.group` (:class:`~algorithms.common.distributed.ProcessGroup`)
  gives each process its share of a batch.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from algorithms.common.checkpoints import (
    check_same_settings,
    latest_checkpoint,
    load_weights,
    restore_rng_state,
    rng_state,
    save_weights,
    write_checkpoint,
)
from algorithms.common.distributed import ProcessGroup
from algorithms.common.nonfinite import NonFiniteGuard, step_if_finite
from algorithms.common.precision import MasterWeights, check_trainable_dtype

__all__ = ["LR_SCHEDULES", "Trainer", "check_arg", "data_digest", "schedule_factor"]

LR_SCHEDULES = ("constant", "linear")
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "state.json"


def check_arg(name: str, value: Any, ok: Callable[[Any], bool], allowed: str) -> None:
    """Refuse an argument with one line naming it, what is allowed and what was given (``ValueError``)."""
    try:
        good = bool(ok(value))
    except TypeError:
        good = False
    if not good:
        raise ValueError(f"{name} must be {allowed}; got {value!r}")


def data_digest(data: Any) -> str:
    """A short fingerprint of a run's training data (anything JSON can write), kept in its settings so that
    a resume on other data is refused."""
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def schedule_factor(step: int, total_steps: int, kind: str = "constant", warmup_steps: int = 0) -> float:
    """The learning rate's share of its peak before step ``step`` (0-based) of ``total_steps``.

    A linear warm-up over the first ``warmup_steps`` steps (``(step + 1) / warmup_steps``: the first step
    already learns), then ``"constant"`` (1) or ``"linear"`` (down to 0 at ``total_steps``). Without warm-up,
    ``"linear"`` is ``1 - step / total_steps``, transformers' ``get_linear_schedule_with_warmup``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    return max(0.0, (total_steps - step) / max(total_steps - warmup_steps, 1))


class Trainer:
    """Optimizer, schedule, finite steps, the non-finite guard and checkpoints of one training loop.

    Args:
        params: the trainable parameters, in a fixed order.
        group: the data-parallel processes (alone: every collective is the identity).
        learning_rate: AdamW's peak learning rate.
        weight_decay: AdamW's weight decay.
        max_grad_norm: clip the gradient's global norm to this (``math.inf``: measure it only).
        lr_schedule: ``"constant"`` or ``"linear"`` (see :func:`schedule_factor`).
        warmup_steps: steps of linear warm-up.
        max_nonfinite: consecutive rounds with a skipped non-finite update before the run stops.
        unit: what a round is called in the guard's messages (``"iteration"``, ``"step"``).
        hint: what to check, in the message that stops the run.
    """

    def __init__(
        self,
        params: Sequence[torch.nn.Parameter],
        group: ProcessGroup,
        *,
        learning_rate: float,
        weight_decay: float = 0.0,
        max_grad_norm: float = math.inf,
        lr_schedule: str = "constant",
        warmup_steps: int = 0,
        max_nonfinite: int = 3,
        unit: str = "step",
        hint: str = "check the learning rate",
    ) -> None:
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be 'constant' or 'linear'; got {lr_schedule!r}")
        self.group = group
        self.learning_rate, self.lr_schedule, self.warmup_steps = learning_rate, lr_schedule, warmup_steps
        self.max_grad_norm = max_grad_norm
        params = list(params)
        check_trainable_dtype(params)
        self.masters = MasterWeights(params)
        # foreach=False: no second set of temporaries the size of the model at the step (the peak on GPUs)
        self.optimizer = torch.optim.AdamW(
            self.masters.params, lr=learning_rate, weight_decay=weight_decay, foreach=False
        )
        self.guard = NonFiniteGuard(max_nonfinite, unit=unit, hint=hint)

    # ------------------------------------------------------------------------------------------ steps
    def learning_rate_at(self, step: int, total_steps: int) -> float:
        """The learning rate of step ``step`` (0-based) of ``total_steps``."""
        return self.learning_rate * schedule_factor(step, total_steps, self.lr_schedule, self.warmup_steps)

    def set_learning_rate(self, step: int, total_steps: int) -> float:
        """Set (and return) the learning rate for step ``step`` of ``total_steps``."""
        lr = self.learning_rate_at(step, total_steps)
        for param_group in self.optimizer.param_groups:
            param_group["lr"] = lr
        return lr

    def zero_grad(self) -> None:
        """Drop the accumulated gradients (of the parameters and of their master copies)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.masters.zero_grad()

    def step(self, finite: bool = True) -> torch.Tensor | None:
        """Average the accumulated gradients over the processes, clip them and step the optimizer, unless
        this process's loss was not finite (``finite=False``) or the averaged gradient is not: then nothing
        changes, in every process. Return the gradient's norm before clipping, or None for a skipped step.
        The gradients are dropped either way. Every process must call it the same number of times."""
        params = [p for param_group in self.optimizer.param_groups for p in param_group["params"]]
        if self.masters.active and list(map(id, params)) != list(map(id, self.masters.params)):
            raise RuntimeError("the optimizer must step the float32 master weights (Trainer.masters.params)")
        self.masters.gradients_to_masters()
        grad_norm = step_if_finite(self.optimizer, params, self.group, finite, self.max_grad_norm)
        if grad_norm is not None:
            self.masters.masters_to_params()
        self.zero_grad()  # free the gradients now, not after the next forward pass: a lower peak
        return grad_norm

    # ------------------------------------------------------------------------------------------ checkpoints
    def save(
        self,
        root: str | Path,
        name: str,
        weights: Mapping[str, torch.nn.Parameter],
        state: Mapping[str, Any],
        keep: int | None,
        weights_file: str = "model.safetensors",
        write_extra: Callable[[Path], None] | None = None,
    ) -> Path:
        """Write the checkpoint ``root/name`` (atomically; see :func:`~algorithms.common.checkpoints.write_checkpoint`)
        and return it: ``weights`` (name -> trainable parameter; their float32 master values, so a resumed run
        loses no bits) into ``weights_file``, the optimizer's state, ``state`` (JSON: the loop's counters) with
        the guard's streak and every process's RNG state, and what ``write_extra(folder)`` adds. Weights that
        hold NaN or inf are refused (``ValueError``) and the earlier checkpoints stay. Every process calls it
        (the RNG states are gathered); the main process writes."""
        rng = rng_state(self.group)  # a collective
        root = Path(root)
        if not self.group.is_main_process:
            return root / name

        def write(folder: Path) -> None:
            save_weights({k: self.masters.master(p) for k, p in weights.items()}, folder / weights_file)
            torch.save(self.optimizer.state_dict(), folder / OPTIMIZER_FILE)
            if write_extra is not None:
                write_extra(folder)
            record = {**state, "nonfinite_streak": self.guard.streak, **rng}
            (folder / STATE_FILE).write_text(json.dumps(record, default=str))

        return write_checkpoint(root, name, write, keep)

    def load(
        self,
        checkpoint: str | Path,
        weights: Mapping[str, torch.nn.Parameter],
        weights_file: str = "model.safetensors",
        what: str = "model",
    ) -> dict[str, Any]:
        """Restore what :meth:`save` wrote in ``checkpoint`` into ``weights``, the optimizer, the guard and this
        process's RNG; return the loop's ``state``. A checkpoint of another model (other tensor names) is
        refused with a one-line ``ValueError`` naming ``what``."""
        checkpoint = Path(checkpoint)
        device = next(iter(weights.values())).device
        values = load_weights(checkpoint / weights_file, weights, device, what)
        self.masters.load([(weights[k], value) for k, value in values.items()])
        self.optimizer.load_state_dict(torch.load(checkpoint / OPTIMIZER_FILE, weights_only=True))
        state = json.loads((checkpoint / STATE_FILE).read_text())
        self.guard.streak = state.get("nonfinite_streak", 0)  # absent from checkpoints before the guard
        restore_rng_state(state, self.group, checkpoint)
        return state

    @staticmethod
    def resume_point(
        checkpoint_dir: str | Path | None, settings: Mapping[str, Any], who: str
    ) -> tuple[Path, dict[str, Any]]:
        """The latest intact checkpoint in ``checkpoint_dir`` and its state, refused (one-line errors) when
        there is none or when it was written with other ``settings`` (what decides the run's course)."""
        if checkpoint_dir is None:
            raise ValueError(
                f"{who}: resume needs checkpoint_dir, the folder of the checkpoints to resume from"
            )
        checkpoint = latest_checkpoint(checkpoint_dir)
        if checkpoint is None:
            raise FileNotFoundError(f"no checkpoint in {checkpoint_dir} to resume from")
        state = json.loads((checkpoint / STATE_FILE).read_text())
        hint = "resume with the same settings and data, or start afresh in another folder"
        check_same_settings(state["settings"], settings, str(checkpoint), hint)
        return checkpoint, state
