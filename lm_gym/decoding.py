"""KV-cached decoding of N rows that start and end at different times.

A vectorized text environment (and any agent that samples from an LM) advances N sequences one token at
a time, and each row restarts with a new prompt whenever its episode ends. :class:`BatchedDecoder` keeps
one key/value cache for all rows, left-padded: every row's valid tokens sit at the right end, so all rows
append their next token at the same cache position and one forward pass serves the whole batch. When a
row restarts, only its new prompt is run (a prefill of the restarting rows alone) and its slot in the cache
is overwritten; the cache grows on the left only if the new prompt is longer than the cache, and columns
that no row uses any more are trimmed. Position ids count each row's own valid tokens, so a row sees the
same positions as when it is run alone.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

__all__ = ["BatchedDecoder", "left_pad"]


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (input_ids, attention_mask), both (R, T_max), left-padded."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.as_tensor(row, dtype=torch.long)
            mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


class BatchedDecoder:
    """Incremental forward passes of a causal LM over ``num_rows`` independent sequences.

    After :meth:`reset_rows` or :meth:`append`, :attr:`logits` (N, V) holds each row's next-token logits
    (float32). No gradients are tracked.

    Args:
        model: a Hugging Face causal LM (kept in eval mode by the caller).
        num_rows: N, the number of sequences.
        pad_token_id: the id written in padded positions (never attended to).
    """

    def __init__(self, model: PreTrainedModel, num_rows: int, pad_token_id: int) -> None:
        self.model = model
        self.num_rows = num_rows
        self.pad_token_id = pad_token_id
        self.tokens: list[list[int]] = [[] for _ in range(num_rows)]
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # (N, C) 1 where the cache holds a row's token
        self.logits: torch.Tensor | None = None  # (N, V)
        self._logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def lengths(self) -> torch.Tensor:
        """(N,) number of tokens each row holds."""
        return torch.tensor([len(t) for t in self.tokens], device=self.device)

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: DynamicCache):
        kwargs = {"logits_to_keep": 1} if self._logits_to_keep else {}
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            **kwargs,
        )
        return out.logits[:, -1].float(), out.past_key_values

    @torch.no_grad()
    def reset_rows(self, rows: Sequence[int], prompts: Sequence[Sequence[int]]) -> None:
        """Start ``rows`` afresh on ``prompts`` (non-empty token lists), leaving the other rows as they are."""
        rows = list(rows)
        if not rows:
            return
        for row, prompt in zip(rows, prompts):
            self.tokens[row] = list(prompt)
        if self.cache is None or sorted(rows) == list(range(self.num_rows)) or not self._surgery_ok():
            self._rebuild()
            return
        ids, mask = left_pad(prompts, self.pad_token_id, self.device)  # (R, P)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits, fresh = self._forward(ids, mask, positions, DynamicCache())
        width, new_width = self.mask.shape[1], mask.shape[1]
        if new_width > width:  # the new prompt is longer than the cache: widen everyone on the left
            grow = new_width - width
            for layer in self.cache.layers:
                layer.keys = _pad_left(layer.keys, grow)
                layer.values = _pad_left(layer.values, grow)
            self.mask = torch.nn.functional.pad(self.mask, (grow, 0))
            width = new_width
        index = torch.tensor(rows, device=self.device)
        for layer, new in zip(self.cache.layers, fresh.layers):
            layer.keys[index] = _pad_left(new.keys, width - new_width)  # (R, H, C, D)
            layer.values[index] = _pad_left(new.values, width - new_width)
        self.mask[index] = torch.nn.functional.pad(mask, (width - new_width, 0))
        self.logits[index] = logits
        self._trim()

    @torch.no_grad()
    def append(self, tokens: torch.Tensor, active: torch.Tensor) -> None:
        """Append ``tokens[i]`` (N,) to every row where ``active[i]``; other rows only get a masked slot."""
        active = active.to(self.device)
        tokens = torch.where(active, tokens.to(self.device), self.pad_token_id)
        lengths = self.lengths  # (N,) position of the new token in its own row
        mask = torch.cat([self.mask, active.long()[:, None]], dim=1)  # (N, C+1)
        logits, self.cache = self._forward(tokens[:, None], mask, lengths[:, None], self.cache)
        self.mask = mask
        self.logits = torch.where(active[:, None], logits, self.logits)
        for i in active.nonzero().flatten().tolist():
            self.tokens[i].append(int(tokens[i]))
        if not bool(active.all()):
            self._trim()

    def _surgery_ok(self) -> bool:
        # Row slots can be rewritten in place only in plain dynamic caches (not sliding-window, quantized...)
        return all(type(layer) is DynamicLayer for layer in self.cache.layers)

    def _rebuild(self) -> None:
        """Recompute the whole cache from the rows' tokens: one prefill of all rows."""
        ids, mask = left_pad(self.tokens, self.pad_token_id, self.device)  # (N, T)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        self.logits, self.cache = self._forward(ids, mask, positions, DynamicCache())
        self.mask = mask

    def _trim(self) -> None:
        used = self.mask.any(dim=0).nonzero()
        first = int(used[0]) if len(used) else self.mask.shape[1]
        if first == 0:
            return
        if not self._surgery_ok():
            self._rebuild()
            return
        for layer in self.cache.layers:
            layer.keys = layer.keys[:, :, first:]
            layer.values = layer.values[:, :, first:]
        self.mask = self.mask[:, first:]


def _pad_left(x: torch.Tensor, n: int) -> torch.Tensor:
    """(B, H, C, D) -> (B, H, n + C, D) with zeros in front."""
    return torch.nn.functional.pad(x, (0, 0, n, 0)) if n else x
