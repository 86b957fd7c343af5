"""Non-finite losses and weights, guarded the same way in every training loop (RL, SFT, reward model).

A NaN or inf loss or gradient (a reward function that returns NaN, a learning rate that blows the weights up)
must never reach the weights, and a run that keeps producing them must stop rather than go on in silence.
:func:`step_if_finite` skips such an update (in every data-parallel process at once); :class:`NonFiniteGuard`
counts the rounds (an RL iteration, an SFT or reward-model step) that skipped one, warns, and stops the run
after ``max_nonfinite`` of them in a row; :func:`check_finite` refuses to write weights that hold NaN or inf
(every checkpoint and exported model goes through it).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

__all__ = ["NonFiniteGuard", "NonFiniteLossError", "check_finite", "step_if_finite"]


class NonFiniteLossError(RuntimeError):
    """Raised when updates kept producing NaN/inf losses; the weights hold the last finite update."""


class NonFiniteGuard:
    """Stops a run after ``max_nonfinite`` consecutive rounds that skipped a non-finite update.

    Args:
        max_nonfinite: consecutive rounds with a skipped update before the run stops.
        unit: what a round is called in the messages (``"iteration"``, ``"step"``).
        hint: what to check, for the message that stops the run.
    """

    def __init__(self, max_nonfinite: int, unit: str, hint: str) -> None:
        if not (isinstance(max_nonfinite, int) and max_nonfinite >= 1):
            raise ValueError(f"max_nonfinite must be an integer >= 1; got {max_nonfinite!r}")
        self.max_nonfinite, self.unit, self.hint = max_nonfinite, unit, hint
        self.streak = 0  # consecutive rounds so far with a skipped update (kept in checkpoints)

    def end_round(self, skipped: int, where: str) -> bool:
        """Close a round that skipped ``skipped`` updates (warning when it skipped any); True when the run
        must stop (then raise :meth:`error`)."""
        if not skipped:
            self.streak = 0
            return False
        self.streak += 1
        warnings.warn(
            f"{where}: skipped {skipped} update(s) with a non-finite loss or gradient; the weights were not "
            "touched",
            RuntimeWarning,
            stacklevel=3,
        )
        return self.streak >= self.max_nonfinite

    def error(self, kept: str) -> NonFiniteLossError:
        """The error that stops the run; ``kept`` says where the last finite weights are."""
        return NonFiniteLossError(
            f"stopped: non-finite loss or gradient in {self.streak} consecutive {self.unit}s ({self.hint}); "
            f"{kept}"
        )


def step_if_finite(
    optimizer: torch.optim.Optimizer,
    params: Sequence[torch.Tensor],
    group: Any,
    finite: bool,
    max_grad_norm: float,
) -> torch.Tensor | None:
    """Average the gradients of ``params`` over the processes of ``group`` (a
    :class:`~algorithms.common.distributed.ProcessGroup`), clip their norm to ``max_grad_norm`` (``inf``: measure it only)
    and step, unless this process's loss is not finite (``finite=False``) or the averaged gradient is not: then
    nothing changes, in every process, since a non-finite loss anywhere enters the average as NaN. Return the
    gradient norm before clipping, or None when the step was skipped. Every process must call it."""
    group.average_gradients(params, poison=not finite)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    if not (finite and torch.isfinite(grad_norm)):
        return None
    optimizer.step()
    return grad_norm


def check_finite(tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]], what: str) -> None:
    """Refuse to write ``what`` (a one-line ``ValueError`` naming the first tensors) when a floating-point
    tensor among ``tensors`` (name -> tensor) holds NaN or inf: a diverged model is never saved."""
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    bad = [name for name, t in items if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise ValueError(
            f"{what} not written: {len(bad)} weight tensor(s) hold NaN or inf ({', '.join(bad[:3])}); the "
            "training diverged (lower the learning rate)"
        )
