"""One forward pass for a LoRA policy and its reference: the env's reference rows and the agent's rows together.

With LoRA the reference is the policy with its adapters off, so one pass over 2N rows through the shared base
weights serves both: N rows with the adapter's update zeroed (the reference, which the environment steps) and
N twin rows with it on (the policy, which the agent samples from and whose hidden states feed the value
head). This saves the second read of the weights each step (1.13x ``generate`` on SmolLM2-135M,
``benchmarks/rollout.py``).

The environment knows nothing of it: it takes the decoder through its one injection point for the reference,
``TextGenVectorEnv(model=peft_model, reference_decoder=decoder)``, and only steps it (``reset_rows``,
``append``) and reads its first N rows' ``logits``. The agent reads :attr:`twin_logits` and :attr:`hidden` of
the same step, after the env's step has advanced it to the observation the env returned.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager

import torch
from transformers import PreTrainedModel

from lm_gym.decoding import BatchedDecoder, RowDecoder
from lm_gym.kinds import model_kind
from lm_gym.seq2seq import Seq2SeqDecoder

__all__ = ["LoRASharedDecoder", "LoRASharedSeq2SeqDecoder", "shared_lora_decoder"]


class _LoRATwins:
    """The twin rows' difference: the LoRA update of ``adapter`` kept on the twins only (mixed into a decoder)."""

    num_rows: int
    device: torch.device

    def _setup_twins(self, model: torch.nn.Module, adapter: str) -> None:
        self.adapter = adapter
        self._lora_b = _twin_lora_b(model, adapter)
        self._all_twins: torch.Tensor | None = None  # the twin row mask of a pass over every row

    def _pass_context(self, rows: list[int]) -> AbstractContextManager:
        every_row = len(rows) == 2 * self.num_rows
        twin_mask = self._all_twins if every_row else None
        if twin_mask is None:
            is_twin = [r >= self.num_rows for r in rows]
            twin_mask = torch.tensor(is_twin, device=self.device, dtype=torch.float32)[:, None, None]
            if every_row:
                self._all_twins = twin_mask
        return _masked_lora(self._lora_b, twin_mask)


class LoRASharedDecoder(_LoRATwins, BatchedDecoder):
    """A :class:`~lm_gym.decoding.BatchedDecoder` of a causal peft model whose N rows are the reference
    (adapters off) and whose N twin rows are the policy (``adapter`` on), in one pass; hidden states kept for
    the value head.

    Args:
        model: the peft model.
        num_rows: N, the number of envs.
        pad_token_id: the id written in padded positions.
        adapter: the LoRA adapter of the policy.
    """

    def __init__(self, model: PreTrainedModel, num_rows: int, pad_token_id: int, adapter: str) -> None:
        BatchedDecoder.__init__(self, model, num_rows, pad_token_id, twins=True, keep_hidden=True)
        self._setup_twins(model, adapter)


class LoRASharedSeq2SeqDecoder(_LoRATwins, Seq2SeqDecoder):
    """:class:`LoRASharedDecoder` for an encoder-decoder peft model (:class:`~lm_gym.seq2seq.Seq2SeqDecoder`)."""

    def __init__(self, model: PreTrainedModel, num_rows: int, pad_token_id: int, adapter: str) -> None:
        Seq2SeqDecoder.__init__(self, model, num_rows, pad_token_id, twins=True, keep_hidden=True)
        self._setup_twins(model, adapter)


def shared_lora_decoder(model: PreTrainedModel, num_rows: int, pad_token_id: int, adapter: str) -> RowDecoder:
    """The shared-pass decoder of ``model``'s kind: its kind's decoder with LoRA twin rows."""
    twinned = {BatchedDecoder: LoRASharedDecoder, Seq2SeqDecoder: LoRASharedSeq2SeqDecoder}
    return twinned[model_kind(model).decoder_class](model, num_rows, pad_token_id, adapter)


def _twin_lora_b(
    model: torch.nn.Module, twin_adapter: str | None
) -> list[tuple[torch.nn.Module, str]] | None:
    """The LoRA layers whose update the twin rows keep, as ``(layer, adapter)`` (None without twins); an
    error when unusable."""
    if not twin_adapter:
        return None
    layers = _plain_lora_layers(model, twin_adapter)
    if layers is None:
        raise ValueError(
            f"twin rows need plain LoRA layers for adapter {twin_adapter!r} (unmerged, without DoRA or "
            "another variant); found none or another kind"
        )
    return [(layer, twin_adapter) for layer in layers]


def _plain_lora_layers(model: torch.nn.Module, adapter: str) -> list[torch.nn.Module] | None:
    """The peft LoRA layers of ``adapter`` if every one is plain (unmerged, no DoRA or other variant, a
    number as its scale), else None.

    Such a layer computes ``y = W x + B(A(x)) * scaling[adapter]``, so a scale of 0 on some rows gives the
    base model's output on those rows: the twin batch needs no per-adapter split of each layer.
    """
    found = []
    for module in model.modules():
        lora_b = getattr(module, "lora_B", None)
        if not isinstance(lora_b, torch.nn.ModuleDict) or adapter not in lora_b:
            continue
        plain = (
            not getattr(module, "merged", False)
            and not getattr(module, "use_dora", {}).get(adapter, False)
            and adapter not in getattr(module, "lora_variant", {})
            and isinstance(getattr(module, "scaling", {}).get(adapter), (int, float))
        )
        if not plain:
            return None
        found.append(module)
    return found or None


@contextmanager
def _masked_lora(layers: list[tuple[torch.nn.Module, str]] | None, row_mask: torch.Tensor | None):
    """Multiply the LoRA update by ``row_mask`` (B, 1, 1) for the duration of one forward pass.

    Each layer's scale becomes ``scale * row_mask`` (in the dtype of its LoRA weights), which the layer
    multiplies its update by anyway: no hook and no extra operation per layer.
    """
    if layers is None or row_mask is None:
        yield
        return
    saved = [layer.scaling[adapter] for layer, adapter in layers]
    masks: dict[tuple[float, torch.dtype], torch.Tensor] = {}  # one tensor per distinct scale and dtype
    try:
        for (layer, adapter), scale in zip(layers, saved):
            key = (scale, layer.lora_B[adapter].weight.dtype)
            if key not in masks:
                masks[key] = (row_mask * scale).to(key[1])
            layer.scaling[adapter] = masks[key]
        yield
    finally:
        for (layer, adapter), scale in zip(layers, saved):
            layer.scaling[adapter] = scale
