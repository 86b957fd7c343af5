"""Data parallelism: one process per device, each with its own share of the work.

``accelerate launch`` (``--multi_gpu``, or with a config), ``torchrun`` or any launcher that sets
``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK`` and ``MASTER_ADDR``/``MASTER_PORT`` starts one copy of the same
command per device. :class:`ProcessGroup` joins them with ``torch.distributed`` (NCCL on CUDA, Gloo on CPU)
and offers the few collectives the training loops need (the on-policy core, SFT, the reward model): the
mean of the gradients before every optimizer step, the global mean and standard deviation of what is
whitened, global metrics, and the broadcast that gives every process the same weights. Alone (no
``WORLD_SIZE`` > 1 and no initialized process group) every collective is the identity and nothing is
initialized, so single-process runs are unchanged.

The model is replicated in every process (DDP's scheme, with the gradients averaged after the backward
pass rather than overlapped with it). Sharded training, DeepSpeed ZeRO or FSDP, is not supported: the
KV-cached rollouts and TRPO's flat gradients run the model's own modules, outside any wrapper that gathers
shards. A launch configured for either is refused with a message rather than silently replicated.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from lm_gym.models import default_device

__all__ = ["ProcessGroup", "is_main_process", "process_device"]

BUCKET_ELEMENTS = 2**24  # gradients are averaged in flat buckets of up to this many elements (64 MB fp32)


def _destroy_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def process_device() -> torch.device:
    """This process's device: its GPU (``cuda:LOCAL_RANK`` under a launcher) when there is one, else the
    CPU; ``accelerate launch --cpu`` forces the CPU."""
    return torch.device("cpu") if _flag("ACCELERATE_USE_CPU") else default_device()


def is_main_process() -> bool:
    """True in the process that writes logs, checkpoints and results (rank 0, or the only one)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


class ProcessGroup:
    """This process's place among the data-parallel processes, and the collectives of the core.

    Initializes ``torch.distributed`` when a launcher asked for more than one process and nobody has yet.

    Args:
        device: where this process's tensors live (the policy's device): NCCL needs CUDA tensors, so
            collectives go through it.
    """

    def __init__(self, device: str | torch.device | None = None) -> None:
        for flag, name in (("ACCELERATE_USE_DEEPSPEED", "DeepSpeed"), ("ACCELERATE_USE_FSDP", "FSDP")):
            if _flag(flag):
                raise ValueError(
                    f"{name} is not supported: lm-gym replicates the model in each process and averages the "
                    "gradients (data parallel); launch without a DeepSpeed/FSDP config, and cut memory with "
                    "LoRA (--lora-r), --dtype bf16 and --gradient-checkpointing instead"
                )
        self.device = torch.device(device) if device is not None else process_device()
        wanted = int(os.environ.get("WORLD_SIZE", "1"))
        if wanted > 1 and dist.is_available() and not dist.is_initialized():
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            # Tear the group down before the interpreter does: Gloo's threads destroyed at exit while
            # still joinable abort the process ("terminate called without an active exception").
            atexit.register(_destroy_process_group)
        self.distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.world_size = dist.get_world_size() if self.distributed else 1
        self.rank = dist.get_rank() if self.distributed else 0

    @property
    def is_main_process(self) -> bool:
        return self.rank == 0

    def shard(self, items: Sequence[Any]) -> Sequence[Any]:
        """This process's contiguous share of ``items`` (all of them alone): rank ``r`` of ``n`` gets
        ``items[r * len // n : (r + 1) * len // n]``, so the shards in rank order are ``items``. A share
        can be empty when there are fewer items than processes."""
        if not self.distributed:
            return items
        n = len(items)
        return items[self.rank * n // self.world_size : (self.rank + 1) * n // self.world_size]

    # ------------------------------------------------------------------------------------------ tensors
    def _all_reduce(self, tensor: torch.Tensor, op: Any = None) -> torch.Tensor:
        """Sum (or ``op``) over processes, in place; through this process's device when it lives elsewhere."""
        op = dist.ReduceOp.SUM if op is None else op
        buffer = tensor if tensor.device == self.device else tensor.to(self.device)
        dist.all_reduce(buffer, op=op)
        if buffer is not tensor:
            tensor.copy_(buffer)
        return tensor

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean over processes of a floating tensor of the same shape everywhere, written in place and
        returned (the tensor itself when alone)."""
        if not self.distributed:
            return tensor
        self._all_reduce(tensor)
        return tensor.div_(self.world_size)

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over processes of a tensor of the same shape everywhere, as a new tensor (the tensor itself
        when alone)."""
        if not self.distributed:
            return tensor
        return self._all_reduce(tensor.clone())

    def sum(self, values: Sequence[float]) -> np.ndarray:
        """Element-wise sums over processes of a few numbers (float64), in one collective."""
        out = torch.tensor(values, dtype=torch.float64)
        return (self._all_reduce(out) if self.distributed else out).numpy()

    def max(self, value: int) -> int:
        """The largest ``value`` over processes."""
        if not self.distributed:
            return value
        return int(self._all_reduce(torch.tensor([value], dtype=torch.int64), dist.ReduceOp.MAX))

    def mean(self, values: Sequence[float]) -> float:
        """The mean of all processes' ``values`` together (NaN when there are none anywhere)."""
        if not self.distributed:
            return float(np.mean(values)) if len(values) else float("nan")
        total, count = self.sum([float(np.sum(values)), len(values)])
        return float(total / count) if count else float("nan")

    def mean_std(self, x: np.ndarray) -> tuple[float, float]:
        """Mean and (population) standard deviation of all processes' arrays together."""
        if not self.distributed:
            return float(x.mean()), float(x.std())
        total, count = self.sum([float(x.sum()), x.size])
        mean = total / count
        (squares,) = self.sum([float(((x - mean) ** 2).sum())])  # two passes, as np.std: no cancellation
        return float(mean), float(np.sqrt(squares / count))

    def mean_of_finite(self, values: dict[str, float]) -> dict[str, float]:
        """Per key, the mean over the processes where the value is finite (NaN where it is nowhere); every
        process must pass the same keys."""
        if not self.distributed or not values:
            return values
        keys = sorted(values)
        x = np.array([values[k] for k in keys], dtype=np.float64)
        finite = np.isfinite(x)
        sums = self.sum([*np.where(finite, x, 0.0), *finite.astype(np.float64)])
        totals, counts = sums[: len(keys)], sums[len(keys) :]
        return {k: float(t / c) if c else float("nan") for k, t, c in zip(keys, totals, counts)}

    # ------------------------------------------------------------------------------------------ parameters
    def average_gradients(self, params: Sequence[torch.Tensor], poison: bool = False) -> None:
        """Replace every ``p.grad`` by its mean over processes (a missing one counts as zeros).

        Args:
            params: the same parameters, in the same order, in every process.
            poison: this process's update must not happen (its loss was not finite): its gradients enter
                as NaN, so every process sees a non-finite gradient and skips the same step.
        """
        if not self.distributed:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if poison:
                p.grad.fill_(float("nan"))
        for bucket in _buckets(params):
            flat = torch.cat([p.grad.reshape(-1) for p in bucket])
            self._all_reduce(flat).div_(self.world_size)
            offset = 0
            for p in bucket:
                p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
                offset += p.numel()

    @torch.no_grad()
    def broadcast_parameters(self, params: Sequence[torch.Tensor]) -> None:
        """Copy the main process's values into ``params`` everywhere (identical starting weights)."""
        if not self.distributed:
            return
        for p in params:
            buffer = p.data if p.device == self.device else p.data.to(self.device)
            dist.broadcast(buffer, src=0)
            if buffer is not p.data:
                p.data.copy_(buffer)

    def gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj`` (picklable), in rank order."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def _buckets(params: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Consecutive runs of same-dtype parameters of up to ``BUCKET_ELEMENTS`` elements (at least one each)."""
    buckets: list[list[torch.Tensor]] = []
    size = 0
    for p in params:
        if buckets and buckets[-1][0].grad.dtype == p.grad.dtype and size + p.numel() <= BUCKET_ELEMENTS:
            buckets[-1].append(p)
            size += p.numel()
        else:
            buckets.append([p])
            size = p.numel()
    return buckets
