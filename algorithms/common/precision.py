"""Training in bfloat16: float32 master weights for the parameters that are stored in low precision.

A policy loaded in bfloat16 (``--dtype bf16``) runs its forward and backward passes in bfloat16, and its
reference, reward model and KV caches take half the memory. The optimizer must not step the bfloat16
weights themselves: bfloat16 keeps 8 bits of mantissa, so an AdamW update smaller than about 1/256 of a
weight (a 1e-5 learning rate on a weight of 0.01) rounds away and that weight never moves. As in
mixed-precision training (Micikevicius et al. 2018, section 3.1), the optimizer holds a float32 copy of each
such weight, steps that copy with the float32 gradient, and writes it back rounded. What is already float32
(the value head, LoRA adapters, which ``peft`` keeps in float32 on a low-precision base) is stepped as is.

float16 is refused for training: its narrow range needs loss scaling, which lm-gym does not do.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

__all__ = ["MasterWeights", "check_trainable_dtype"]


def check_trainable_dtype(model: torch.nn.Module | Iterable[torch.nn.Parameter]) -> None:
    """Refuse to train a float16 model or parameters (with a message naming what works)."""
    params = model.parameters() if isinstance(model, torch.nn.Module) else model
    dtypes = {p.dtype for p in params}
    if torch.float16 in dtypes:
        raise ValueError(
            "float16 weights cannot be trained here: float16 gradients under- and overflow without loss "
            "scaling, which lm-gym does not do. Use dtype bf16 (same memory, float32's range) or fp32; "
            "fp16 is fine for inference (lm-gym eval)"
        )


class MasterWeights:
    """float32 master copies of the low-precision parameters among ``params``; the optimizer steps these.

    Args:
        params: the trainable parameters, in optimizer order.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter]) -> None:
        self.pairs: list[tuple[torch.nn.Parameter, torch.nn.Parameter]] = []
        for p in params:
            master = p if p.dtype == torch.float32 else torch.nn.Parameter(p.detach().float().clone())
            self.pairs.append((p, master))
        self._master_of = {id(p): m for p, m in self.pairs}

    @property
    def params(self) -> list[torch.nn.Parameter]:
        """What the optimizer steps: the float32 parameters themselves and the masters of the others."""
        return [m for _, m in self.pairs]

    @property
    def active(self) -> bool:
        """Whether any parameter has a separate master copy."""
        return any(p is not m for p, m in self.pairs)

    def master(self, param: torch.Tensor) -> torch.Tensor:
        """The float32 value the optimizer holds for ``param`` (``param`` itself when it is float32)."""
        return self._master_of.get(id(param), param)

    def gradients_to_masters(self) -> None:
        """Move each low-precision gradient, as float32, to its master (the parameter's own is freed)."""
        for p, m in self.pairs:
            if p is not m:
                m.grad = None if p.grad is None else p.grad.float()
                p.grad = None

    def zero_grad(self) -> None:
        for p, m in self.pairs:
            p.grad = m.grad = None

    @torch.no_grad()
    def masters_to_params(self) -> None:
        """Write the stepped masters back into the low-precision parameters (rounded)."""
        for p, m in self.pairs:
            if p is not m:
                p.copy_(m)

    @torch.no_grad()
    def load(self, values: Sequence[tuple[torch.nn.Parameter, torch.Tensor]]) -> None:
        """Set parameters and their masters from ``(param, value)`` pairs (a checkpoint's float32 values)."""
        for p, value in values:
            p.copy_(value)
            master = self.master(p)
            if master is not p:
                master.copy_(value)
