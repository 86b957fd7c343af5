"""KV-cached decoding of N rows that start and end at different times.

A vectorized text environment (and any agent that samples from an LM) advances N sequences one token at
a time, and each row restarts with a new prompt whenever its episode ends. :class:`BatchedDecoder` keeps
one key/value cache for all rows, left-padded: every row's valid tokens sit at the right end, so all rows
append their next token at the same cache position and one forward pass serves the whole batch. When a
row restarts, only its new prompt is run (a prefill of the restarting rows alone) and its slot in the cache
is overwritten; the cache grows on the left only if the new prompt is longer than the cache, and columns
that no row uses any more are trimmed. Position ids count each row's own valid tokens, so a row sees the
same positions as when it is run alone. The cache's layers (:class:`AppendLayer`) write each step into free
columns of a buffer instead of copying the whole cache as ``DynamicLayer`` does.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext

import numpy as np
import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

__all__ = ["CACHE", "AppendLayer", "BatchedDecoder", "append_cache", "left_pad", "torch_threads"]

# The name of the key/value cache in a model's forward arguments and outputs: transformers 5.x renamed
# ``past_key_values`` to ``cache`` (the old name warns, and goes in 5.40). Found from the output class's fields
# so that the releases before the rename keep working: ``model(**{CACHE: cache})``, ``getattr(out, CACHE)``.
CACHE = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


@contextmanager
def torch_threads(n: int | None):
    """Run the block with ``n`` intra-op torch threads in this thread (None: leave as is).

    Nothing is set when ``n`` is the current count: calling ``torch.set_num_threads`` with the count it
    already has was measured to slow the rollouts after it by ~4% (benchmarks/rollout.py on ``tiny``).
    """
    if n is None or n == torch.get_num_threads():
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def left_pad(
    rows: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (input_ids, attention_mask), both (R, T_max), left-padded."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.as_tensor(row, dtype=torch.long)
            mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


class RowDecoder:
    """What the KV-cached decoders share (:class:`BatchedDecoder`, :class:`~lm_gym.seq2seq.Seq2SeqDecoder`):
    N rows, optionally each with a twin row, and the views of their last logits and hidden states.

    This is also the protocol by which ``TextGenVectorEnv(reference_decoder=...)`` steps its reference: the
    env calls :meth:`reset_rows` and :meth:`append` and reads :attr:`logits` (the first N rows). Twin rows
    are N more rows that follow the same tokens in the same forward pass; a subclass decides how they differ
    from the N rows by overriding :meth:`_pass_context` (e.g. ``algorithms.shared_pass``: the N rows with a
    LoRA adapter off, the twins with it on). Subclasses set ``num_rows``, ``twins``, ``keep_hidden``,
    ``model``, ``_logits`` and ``_hidden``."""

    num_rows: int
    twins: bool  # every row has a twin row, run in the same pass (see _pass_context)
    keep_hidden: bool
    model: torch.nn.Module
    _logits: torch.Tensor | None
    _hidden: torch.Tensor | None

    @property
    def logits(self) -> torch.Tensor:
        """(N, V) next-token logits of each row (with twins: the first N physical rows)."""
        return self._logits[: self.num_rows]

    @property
    def twin_logits(self) -> torch.Tensor:
        """(N, V) next-token logits of the twin rows."""
        if not self.twins:
            raise RuntimeError("this decoder has no twin rows (built with twins=False)")
        return self._logits[self.num_rows :]

    @property
    def hidden(self) -> torch.Tensor:
        """(N, H) last (decoder) layer's hidden state at each row's last token (the twins' with
        twins)."""
        if not self.keep_hidden:
            raise RuntimeError("this decoder does not keep hidden states (keep_hidden=False)")
        return self._hidden[self.num_rows :] if self.twins else self._hidden

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _physical(self, rows: list[int]) -> list[int]:
        """The physical rows of ``rows`` (of the N): with twins, the rows and then their twins."""
        return rows + [r + self.num_rows for r in rows] if self.twins else rows

    def _for_physical_rows(self, values: list | torch.Tensor) -> list | torch.Tensor:
        """Per-row ``values`` (a list, or a tensor over its first axis) for the physical rows that
        :meth:`_physical` lists: with twins, the twins take the same values."""
        if not self.twins:
            return values
        return torch.cat([values, values]) if isinstance(values, torch.Tensor) else [*values, *values]

    def _pass_context(self, rows: list[int]) -> AbstractContextManager:
        """The context one forward pass over the physical ``rows`` runs in (twin rows are ``>= num_rows``);
        nothing by default."""
        return nullcontext()


class AppendLayer(DynamicLayer):
    """A ``DynamicLayer`` that appends a step's keys and values in place instead of concatenating.

    ``DynamicLayer.update`` builds a new tensor at every step (``torch.cat``), copying the whole cache: O(T)
    per token, O(T^2) per sequence: on ``tiny`` about a third of the time of a decoding step's attention.
    Here ``keys`` and ``values`` are views of the first columns of buffers with free columns after them (half
    as many again as are used, at least 64: each token is copied O(1) times on average, for at most 1.5x the
    memory plus 64 columns), and a step writes only its own columns. A view that the cache's owner replaced
    (row surgery, trimming, ``crop``) is noticed: trimmed views of the buffer keep appending in place, any
    other tensor is copied into a new buffer at the next update.
    """

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self._storage = (None, None)
        self.keys, keys_buffer = _append_columns(self.keys, self._storage[0], key_states)
        self.values, values_buffer = _append_columns(self.values, self._storage[1], value_states)
        self._storage = (keys_buffer, values_buffer)
        return self.keys, self.values


def append_cache() -> DynamicCache:
    """An empty ``DynamicCache`` whose layers are :class:`AppendLayer` s."""
    cache = DynamicCache()
    cache.layer_class_to_replicate = AppendLayer
    return cache


def _append_columns(
    cached: torch.Tensor, buffer: torch.Tensor | None, new: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cat([cached, new], dim=-2)`` (B, H, C + n, D) written into ``buffer``'s free columns when ``cached``
    is a view of its columns [s, s + C) with room after them, else into a new buffer; (the view, buffer)."""
    length = cached.shape[-2] if cached.dim() == new.dim() else 0  # lazy_initialization's empty tensor
    added = new.shape[-2]
    start = _column_start(cached, buffer) if length else None
    if start is None or start + length + added > buffer.shape[-2]:
        needed = length + added
        room = needed + max(needed // 2, 64)  # free columns: half as many again, at least 64
        buffer = new.new_empty((*new.shape[:-2], room, new.shape[-1]))
        if length:
            buffer[..., :length, :] = cached
        start = 0
    end = start + length + added
    buffer[..., end - added : end, :] = new
    return buffer[..., start:end, :], buffer


def rewritable_layers(layers: Sequence[object]) -> bool:
    """Whether every cache layer is a plain dynamic one (``DynamicLayer`` or :class:`AppendLayer`), whose row
    slots the decoders may rewrite in place (not sliding-window, quantized...)."""
    return all(type(layer) in (DynamicLayer, AppendLayer) for layer in layers)


def _column_start(view: torch.Tensor, buffer: torch.Tensor | None) -> int | None:
    """s when ``view`` is ``buffer[..., s:s + C, :]``, else None."""
    if (
        buffer is None
        or view.untyped_storage().data_ptr() != buffer.untyped_storage().data_ptr()
        or view.stride() != buffer.stride()
        or view.shape[:-2] != buffer.shape[:-2]
        or view.shape[-1] != buffer.shape[-1]
    ):
        return None
    offset, column = view.storage_offset() - buffer.storage_offset(), buffer.stride(-2)
    if offset < 0 or offset % column:
        return None
    start = offset // column
    return start if start + view.shape[-2] <= buffer.shape[-2] else None


class BatchedDecoder(RowDecoder):
    """Incremental forward passes of a causal LM over ``num_rows`` independent sequences.

    After :meth:`reset_rows` or :meth:`append`, :attr:`logits` (N, V) holds each row's next-token logits
    (float32). The forward passes run in ``torch.inference_mode`` (no autograd bookkeeping: ~10% less time
    per step on small models), so ``logits``, ``hidden`` and the cache are inference tensors: read them
    freely (what is computed from them outside the decoder is an ordinary tensor), never modify them in place.

    With ``twins``, every row has a twin row that follows the same tokens in the same forward pass of 2N
    rows; a subclass makes the twins differ (:meth:`RowDecoder._pass_context`).

    Args:
        model: a Hugging Face causal LM (kept in eval mode by the caller), or a peft model.
        num_rows: N, the number of sequences.
        pad_token_id: the id written in padded positions (never attended to).
        twins: give every row a twin row (see :class:`RowDecoder`).
        keep_hidden: also keep each row's last hidden state (:attr:`hidden`), e.g. for a value head.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        num_rows: int,
        pad_token_id: int,
        *,
        twins: bool = False,
        keep_hidden: bool = False,
    ) -> None:
        self.model = model
        self.keep_hidden = keep_hidden
        self._hidden: torch.Tensor | None = None  # (rows, H)
        self._new_hidden: torch.Tensor | None = None
        self.num_rows = num_rows
        self.pad_token_id = pad_token_id
        self.twins = twins
        self.tokens: list[list[int]] = [[] for _ in self._physical(list(range(num_rows)))]  # twins last
        self.version = 0  # counts the changes of ``tokens`` (reset_rows, append)
        # (version, input_ids, attention_mask as bool) of the observation lm_gym.sampling.follow_arrays
        # last brought the rows to
        self.observed: tuple[int, np.ndarray, np.ndarray] | None = None
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # (rows, C) 1 where the cache holds a row's token
        self._logits: torch.Tensor | None = None  # (rows, V)
        forward = model.get_base_model().forward if hasattr(model, "get_base_model") else model.forward
        self._logits_to_keep = "logits_to_keep" in inspect.signature(forward).parameters
        self._padding_mask_4d = _padding_mask_suffices(model)

    @property
    def lengths(self) -> torch.Tensor:
        """(rows,) number of tokens each physical row holds."""
        return torch.tensor([len(t) for t in self.tokens], device=self.device)

    def _forward(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        cache: DynamicCache,
        rows: list[int],
    ) -> tuple[torch.Tensor, DynamicCache]:
        kwargs: dict = {"logits_to_keep": 1} if self._logits_to_keep else {}
        with self._pass_context(rows):
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                **{CACHE: cache},
                output_hidden_states=self.keep_hidden,
                **kwargs,
            )
        if self.keep_hidden:
            self._new_hidden = out.hidden_states[-1][:, -1]  # (R, H) the last layer, after the final norm
        return out.logits[:, -1].float(), getattr(out, CACHE)

    @torch.inference_mode()
    def reset_rows(self, rows: Sequence[int], prompts: Sequence[Sequence[int]]) -> None:
        """Start ``rows`` afresh on ``prompts`` (non-empty token lists), leaving the other rows as they are."""
        rows, prompts = self._physical(list(rows)), self._for_physical_rows(list(prompts))
        if not rows:
            return
        self.version += 1
        for row, prompt in zip(rows, prompts):
            self.tokens[row] = list(prompt)
        if self.cache is None or len(rows) == len(self.tokens) or not self._surgery_ok():
            self._rebuild()
            return
        ids, mask = left_pad(prompts, self.pad_token_id, self.device)  # (R, P)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits, fresh = self._forward(ids, mask, positions, append_cache(), rows)
        width, new_width = self.mask.shape[1], mask.shape[1]
        if new_width > width:  # the new prompt is longer than the cache: widen everyone on the left
            grow = new_width - width
            for layer in self.cache.layers:
                layer.keys = pad_cache_left(layer.keys, grow)
                layer.values = pad_cache_left(layer.values, grow)
            self.mask = torch.nn.functional.pad(self.mask, (grow, 0))
            width = new_width
        index = torch.tensor(rows, device=self.device)
        for layer, new in zip(self.cache.layers, fresh.layers):
            layer.keys[index] = pad_cache_left(new.keys, width - new_width)  # (R, H, C, D)
            layer.values[index] = pad_cache_left(new.values, width - new_width)
        self.mask[index] = torch.nn.functional.pad(mask, (width - new_width, 0))
        self._logits[index] = logits
        if self.keep_hidden:
            self._hidden[index] = self._new_hidden
        self._trim()

    @torch.inference_mode()
    def append(self, tokens: torch.Tensor, active: torch.Tensor) -> None:
        """Append ``tokens[i]`` (N,) to every row where ``active[i]``; other rows only get a masked slot."""
        self.version += 1
        device = self.mask.device
        active = active.to(device)
        everyone = bool(active.all())
        tokens = tokens.to(device)
        if not everyone:
            tokens = torch.where(active, tokens, self.pad_token_id)
        tokens, active = self._for_physical_rows(tokens), self._for_physical_rows(active)
        # the new tokens' positions: each row's count of tokens so far, which its mask holds
        positions = self.mask.sum(1, keepdim=True)  # (rows, 1)
        mask = torch.cat([self.mask, active[:, None].to(self.mask.dtype)], dim=1)  # (rows, C+1)
        # one new token per row: its attention mask is the padding mask, (rows, 1, 1, C+1), which transformers
        # would otherwise rebuild from the 2-D mask at every step
        attention = mask.bool()[:, None, None, :] if self._padding_mask_4d else mask
        logits, self.cache = self._forward(
            tokens[:, None], attention, positions, self.cache, list(range(len(self.tokens)))
        )
        self.mask = mask
        self._logits = logits if everyone else torch.where(active[:, None], logits, self._logits)
        if self.keep_hidden:
            self._hidden = (
                self._new_hidden if everyone else torch.where(active[:, None], self._new_hidden, self._hidden)
            )
        if everyone:
            for row, token in zip(self.tokens, tokens.tolist()):
                row.append(token)
        else:
            for row, token, on in zip(self.tokens, tokens.tolist(), active.tolist()):
                if on:
                    row.append(token)
            self._trim()

    def _surgery_ok(self) -> bool:
        return rewritable_layers(self.cache.layers)

    @torch.inference_mode()
    def _rebuild(self) -> None:
        """Recompute the whole cache from the rows' tokens: one prefill of all rows."""
        ids, mask = left_pad(self.tokens, self.pad_token_id, self.device)  # (N, T)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        self._logits, self.cache = self._forward(
            ids, mask, positions, append_cache(), list(range(len(self.tokens)))
        )
        self._hidden = self._new_hidden
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


# families whose decoder layers all use the plain causal mask (nothing else when the config says so below)
_FULL_ATTENTION_MODELS = frozenset({"llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2", "granite"})


def _padding_mask_suffices(model: torch.nn.Module) -> bool:
    """Whether a one-token step may be given its 4-D boolean padding mask directly: SDPA attention (which
    takes boolean masks) and every layer plain causal attention (no sliding window, no chunks)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if config is None or getattr(config, "model_type", None) not in _FULL_ATTENTION_MODELS:
        return False
    if getattr(config, "_attn_implementation", None) != "sdpa" or getattr(
        config, "attention_chunk_size", None
    ):
        return False
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return all(kind == "full_attention" for kind in layer_types)
    return getattr(config, "sliding_window", None) is None


def pad_cache_left(x: torch.Tensor, n: int) -> torch.Tensor:
    """(B, H, C, D) -> (B, H, n + C, D) with zeros in front."""
    return torch.nn.functional.pad(x, (0, 0, n, 0)) if n else x
