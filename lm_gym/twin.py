"""Two causal LMs of one architecture run as one: the reference and a fully fine-tuned policy in one pass.

With LoRA the reference is the policy with its adapters off, so one forward pass over 2N rows serves both
(:mod:`lm_gym.decoding`'s twin rows). With full fine-tuning they are two weight sets, and a rollout step runs
two forward passes of N rows. For a small model (or any model on a GPU at small batch) such a pass costs
mostly per-operation overhead (Python, dispatch, kernel launches), not arithmetic, so two passes cost about
twice one. :func:`twin_model` builds a module with the structure of the reference whose forward pass over 2N
rows sends rows ``[0, N)`` through the reference's weights and rows ``[N, 2N)`` through the policy's:

* every ``nn.Linear`` pair is one batched matmul over the two weight matrices, (2, out, in);
* every ``nn.Embedding`` pair is one lookup in the two tables, the policy's rows offset by V;
* every RMSNorm pair is one call with the two scale vectors broadcast over the two halves;
* any other module holding weights runs each half through its own module and concatenates;
* modules without weights (attention arithmetic, rotary embeddings, activations, the KV cache) are shared:
  they run once for all 2N rows.

The weights stay the models' own: building the twin re-points each pair of parameters (their ``.data``, as
FSDP does with its flat parameters) to the two halves of one (2, ...) tensor, so reading both stacked costs
nothing and every in-place change (an optimizer step, ``load_state_dict``, ``.data.copy_``) is seen at the
next pass. A parameter re-pointed elsewhere later (``.to()``, a ``.data`` swap) is noticed and then stacked
afresh at each pass: slower, never stale. The twin is checked against the two models on a probe batch when
it is built; a model it cannot reproduce is refused with the reason. Per step this saves the per-operation
overhead of a second pass (Python, dispatch, kernel launches), which is most of the cost of a small model;
``TextGenVectorEnv`` uses it below ``TWIN_MAX_PARAMETERS``, and overlaps two passes in two threads above.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TWIN_MAX_PARAMETERS", "twin_model"]

# Above this many parameters per model a pass is arithmetic-bound: a twin pass saves little, and two passes
# overlapped in two threads keep the cores as busy (TextGenVectorEnv's default switch between the two).
TWIN_MAX_PARAMETERS = 20_000_000


class _TwinLeaf(nn.Module):
    """A module pair of which the first half of the rows (dim 0) goes through ``a``, the rest through ``b``."""

    def __init__(self, a: nn.Module, b: nn.Module) -> None:
        super().__init__()
        # kept out of _modules: the twin owns no parameters (its .parameters() is empty)
        object.__setattr__(self, "a", a)
        object.__setattr__(self, "b", b)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        n = x.shape[0] // 2
        return torch.cat([self.a(x[:n], *args, **kwargs), self.b(x[n:], *args, **kwargs)])


class _Pair:
    """Two same-shaped parameters ``a`` and ``b`` whose storage is made the two halves of one (2, ...) tensor
    (their ``.data`` re-pointed, no copy kept), so the stacked weights cost nothing to read. Should either
    parameter be re-pointed elsewhere later (``.to()``, a ``.data`` swap), :meth:`stacked` stacks afresh."""

    def __init__(self, a: nn.Parameter, b: nn.Parameter) -> None:
        self.a, self.b = a, b
        with torch.inference_mode(False), torch.no_grad():  # ordinary tensors: the policy trains on them
            self.both = torch.stack([a.detach(), b.detach()])  # (2, ...)
        a.data, b.data = self.both[0], self.both[1]
        self._a, self._b = a.data_ptr(), b.data_ptr()

    def shared(self) -> bool:
        """Whether both parameters still live in ``both``."""
        return self.a.data_ptr() == self._a and self.b.data_ptr() == self._b

    def stacked(self) -> torch.Tensor:
        return self.both if self.shared() else torch.stack([self.a, self.b])


class _TwinLinear(_TwinLeaf):
    def __init__(self, a: nn.Linear, b: nn.Linear, pairs: dict) -> None:
        super().__init__(a, b)
        self.weights = _pair(a.weight, b.weight, pairs)  # not ``weight``: no tensor of that name here
        self.biases = None if a.bias is None else _pair(a.bias, b.bias, pairs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (2N, ..., in) -> (2N, ..., out)
        weight_t = self.weights.stacked().transpose(1, 2)  # (2, in, out), a view
        x2 = x.reshape(2, -1, x.shape[-1])  # (2, N*..., in)
        if self.biases is None:
            y = torch.bmm(x2, weight_t)
        else:
            y = torch.baddbmm(self.biases.stacked()[:, None], x2, weight_t)
        return y.reshape(*x.shape[:-1], weight_t.shape[2])  # (2N, ..., out)


class _TwinEmbedding(_TwinLeaf):
    def __init__(self, a: nn.Embedding, b: nn.Embedding, pairs: dict) -> None:
        super().__init__(a, b)
        self.weights = _pair(a.weight, b.weight, pairs)
        self._offset: tuple | None = None  # (ids shape and device, the row offsets (2N, 1...))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (2N, T) -> (2N, T, H)
        table = self.weights.stacked()  # (2, V, H)
        vocab = table.shape[1]
        key = (ids.shape, ids.device)
        if self._offset is None or self._offset[0] != key:
            offset = torch.zeros((ids.shape[0],) + (1,) * (ids.dim() - 1), dtype=ids.dtype, device=ids.device)
            offset[ids.shape[0] // 2 :] = vocab  # the policy's rows look up the second table
            self._offset = (key, offset)
        # (max_norm is refused; padding_idx matters for gradients only)
        return F.embedding(ids + self._offset[1], table.reshape(2 * vocab, -1))


class _TwinScale(_TwinLeaf):
    """A norm whose only weight scales the last dimension elementwise (RMSNorm): one call with the two weights
    broadcast over the two halves."""

    def __init__(self, a: nn.Module, b: nn.Module, pairs: dict) -> None:
        super().__init__(a, b)
        self.weights = _pair(a.weight, b.weight, pairs)
        both = copy.copy(a)  # a's code and settings; its weight swapped for the stacked one per call
        both._parameters = dict(a._parameters)
        object.__setattr__(self, "both", both)  # not a submodule: the twin owns no parameters

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (2N, ..., H) -> (2N, ..., H)
        self.both._parameters["weight"] = self.weights.stacked()[:, None]  # (2, 1, H)
        return self.both(x.reshape(2, -1, x.shape[-1])).reshape(x.shape)


def _pair(a: nn.Parameter, b: nn.Parameter, pairs: dict) -> _Pair:
    key = (id(a), id(b))  # tied weights (input and output embeddings) share one pair
    if key not in pairs:
        pairs[key] = _Pair(a, b)
    return pairs[key]


def _is_scale_norm(module: nn.Module) -> bool:
    params = dict(module.named_parameters(recurse=False))
    return (
        type(module).__name__.endswith("RMSNorm")
        and list(params) == ["weight"]
        and params["weight"].dim() == 1
    )


def _twin(a: nn.Module, b: nn.Module, path: str, pairs: dict) -> nn.Module:
    if type(a) is not type(b):
        raise ValueError(f"{path or 'the model'}: {type(a).__name__} against {type(b).__name__}")
    own = dict(a.named_parameters(recurse=False))
    if own:
        theirs = dict(b.named_parameters(recurse=False))
        if own.keys() != theirs.keys() or any(own[k].shape != theirs[k].shape for k in own):
            raise ValueError(f"{path}: the two models' weights differ in shape")
        if any(own[k].dtype != theirs[k].dtype or own[k].device != theirs[k].device for k in own):
            raise ValueError(f"{path}: the two models' weights differ in dtype or device")
        if list(a.children()):
            raise ValueError(f"{path}: {type(a).__name__} holds weights and submodules")
        if type(a) is nn.Linear:
            return _TwinLinear(a, b, pairs)
        if type(a) is nn.Embedding and a.max_norm is None:
            return _TwinEmbedding(a, b, pairs)
        if _is_scale_norm(a):
            return _TwinScale(a, b, pairs)
        return _TwinLeaf(a, b)
    for name, buffer in a.named_buffers(recurse=False):
        other = b._buffers.get(name)
        if other is None or other.shape != buffer.shape or not torch.equal(other, buffer):
            raise ValueError(f"{path}: the buffer {name!r} differs between the two models")
    if not list(a.children()):
        return a  # no weights of its own: one instance serves both halves
    twin = copy.copy(a)  # a shallow copy: attributes shared, the submodule table replaced
    twin._modules = {}
    twin._parameters = {}
    twin._buffers = dict(a._buffers)
    for name, child in a.named_children():
        other = b._modules.get(name)
        if other is None:
            raise ValueError(f"{path}.{name}: missing from the policy")
        twin._modules[name] = _twin(child, other, f"{path}.{name}" if path else name, pairs)
    return twin


@torch.no_grad()
def twin_model(reference: nn.Module, policy: nn.Module, *, check: bool = True) -> nn.Module:
    """A module computing ``reference`` on the first half of a batch and ``policy`` on the second, in one pass.

    Args:
        reference: a causal LM (e.g. the frozen initial model).
        policy: a causal LM of the same class and shapes (e.g. the policy being fully fine-tuned).
        check: run both models and the twin on a probe batch and refuse the twin if its logits differ.

    Returns:
        a module taking the inputs of both halves stacked on dim 0 (2N rows: the reference's N, then the
        policy's N) and returning the model's output over the 2N rows (logits, KV cache, hidden states). It
        holds no weights of its own (``parameters()`` is empty); the models' parameters are re-pointed into
        shared storage (same values, same ``Parameter`` objects) and read at every pass.

    Raises:
        ValueError: the two models differ in structure, shapes, dtype or device, or the twin does not
        reproduce them (naming the module or the error).
    """
    if hasattr(reference, "peft_config") or hasattr(policy, "peft_config"):
        raise ValueError("twin_model: pass plain models; a LoRA policy shares one pass through twin rows")
    if reference is policy:
        raise ValueError("twin_model: the reference and the policy are one model; pass two")
    twin = _twin(reference, policy, "", {})
    if check:
        _check(twin, reference, policy)
    return twin


def _check(twin: nn.Module, reference: nn.Module, policy: nn.Module) -> None:
    device = next(reference.parameters()).device
    vocab = reference.get_input_embeddings().weight.shape[0]
    ids = torch.arange(6, device=device).reshape(1, 6) % vocab  # (1, 6)
    modes = [m.training for m in (reference, policy)]
    reference.eval()
    policy.eval()
    try:
        expected = torch.cat([reference(input_ids=ids).logits, policy(input_ids=ids).logits]).float()
        got = twin(input_ids=ids.repeat(2, 1)).logits.float()
    except Exception as error:  # what a model whose forward does not split by rows raises
        raise ValueError(f"twin_model: the twin pass failed ({type(error).__name__}: {error})") from error
    finally:
        reference.train(modes[0])
        policy.train(modes[1])
    scale = expected.abs().max().clamp(min=1.0)
    if got.shape != expected.shape or not bool((got - expected).abs().max() <= 1e-3 * scale):
        raise ValueError("twin_model: the twin pass does not reproduce the two models' logits")
