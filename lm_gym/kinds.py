"""Causal and encoder-decoder LMs: everything that differs between the two kinds, decided in one place.

A causal LM reads the prompt and the text generated so far as one sequence. An encoder-decoder LM (T5-style,
RL4LMs' seq2seq policies) reads the prompt as its *source*, once, with its encoder, and generates the text
with its decoder from ``decoder_start_token_id``. What depends on the kind -- the loader, the observation
space and its Hugging Face layout, the observation rows the environment writes, the KV-cached decoder that
follows the observations, the teacher-forced sequences of a rollout's episode segments and the forward pass
over them -- is a method of the model's :class:`ModelKind` (:func:`model_kind`). The environment, the policy,
the rollout buffer and the algorithms call it and never test the kind themselves.

The two layouts (see :mod:`lm_gym.spaces`): a causal observation in HF layout is ``input_ids`` /
``attention_mask``, the prompt and the text at the right end; an encoder-decoder's adds
``decoder_input_ids`` / ``decoder_attention_mask``, the start token and the text at the right end, while
``input_ids`` holds the source at the left end. Either way the *text* (:attr:`ModelKind.text_keys`) is the
sequence the actions extend, one token per step, so its last column holds the last token.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lm_gym.decoding import BatchedDecoder, RowDecoder
from lm_gym.models import is_seq2seq_lm, load_causal_lm, load_seq2seq_lm
from lm_gym.sampling import follow_arrays, last_tokens
from lm_gym.seq2seq import Seq2SeqDecoder, follow_seq2seq, is_encoder_decoder
from lm_gym.spaces import hf_inputs, seq2seq_observation_space, token_observation_space

__all__ = ["CAUSAL", "SEQ2SEQ", "CausalKind", "ModelKind", "Seq2SeqKind", "load_lm", "model_kind"]


class ModelKind(ABC):
    """The questions whose answer depends on the kind of LM; :data:`CAUSAL` and :data:`SEQ2SEQ` answer them.

    Attributes:
        is_encoder_decoder: the model's ``config.is_encoder_decoder``.
        description: the kind in a sentence (``"a causal"`` LM, ``"an encoder-decoder"`` LM).
        decoder_class: the KV-cached decoder of this kind (:mod:`lm_gym.decoding`, :mod:`lm_gym.seq2seq`).
        peft_task_type: the ``task_type`` of a peft ``LoraConfig`` for this kind.
        hf_keys: the keys of an observation in HF layout, and of the rollout buffer's observation arrays.
        text_keys: the ids and mask keys of the text, the sequence the actions extend (right-aligned).
    """

    is_encoder_decoder: bool
    description: str
    decoder_class: type[RowDecoder]
    peft_task_type: str | None
    hf_keys: tuple[str, ...]
    text_keys: tuple[str, str]

    # ------------------------------------------------------------------------------------------ observations
    @abstractmethod
    def observation_space(self, vocab_size: int, max_prompt_tokens: int, max_new_tokens: int) -> spaces.Box:
        """The environment's single observation space for prompts of ``max_prompt_tokens`` and texts of
        ``max_new_tokens``."""

    @abstractmethod
    def position_lengths(self, max_prompt_tokens: int, max_new_tokens: int) -> list[tuple[str, int]]:
        """The sequence lengths the model must hold positions for, each with what it is made of."""

    def hf_inputs(
        self, obs: np.ndarray | torch.Tensor, pad_token_id: int = 0
    ) -> dict[str, np.ndarray] | dict[str, torch.Tensor]:
        """An observation (or a batch) of this kind's space in HF layout (:func:`lm_gym.spaces.hf_inputs`)."""
        return hf_inputs(obs, pad_token_id, encoder_decoder=self.is_encoder_decoder)

    @abstractmethod
    def observation_widths(self, max_prompt_tokens: int, max_new_tokens: int) -> dict[str, int]:
        """The width of each array of the environment's observation in HF layout."""

    @abstractmethod
    def write_observation_row(
        self,
        obs: dict[str, np.ndarray],
        row: int,
        seq: Sequence[int],
        prompt_len: int,
        pad_token_id: int,
        decoder: RowDecoder,
    ) -> None:
        """Rewrite ``row`` of the HF-layout arrays ``obs`` (N, width), in place, from ``seq``, the prompt's
        ``prompt_len`` tokens and the text generated so far (empty: a row that has not started, all padding).
        ``decoder`` is the environment's reference decoder (an encoder-decoder's gives the start token)."""

    def advance_observation(self, obs: dict[str, np.ndarray], actions: np.ndarray) -> dict[str, np.ndarray]:
        """``obs`` after every row's text gained ``actions`` (N,) at its right end: the text shifted left by
        one column, the other arrays copied (all new arrays). Nothing falls off the left: the text of a row
        still generating is shorter than its width (at most ``max_new_tokens`` tokens after the prompt or the
        start token). Rows that restart are rewritten afterwards (:meth:`write_observation_row`)."""
        ids_key, mask_key = self.text_keys
        advanced = {key: value.copy() for key, value in obs.items() if key not in self.text_keys}
        ids, mask = obs[ids_key], obs[mask_key]  # (N, T)
        advanced[ids_key] = np.concatenate([ids[:, 1:], actions[:, None]], axis=1)
        advanced[mask_key] = np.concatenate([mask[:, 1:], np.ones_like(mask[:, :1])], axis=1)
        return advanced

    # ------------------------------------------------------------------------------------------ decoding
    def decoder(self, model: PreTrainedModel, num_rows: int, pad_token_id: int, **kwargs: Any) -> RowDecoder:
        """A KV-cached decoder of ``model`` for ``num_rows`` rows (``kwargs``: the decoder's, e.g.
        ``keep_hidden``)."""
        return self.decoder_class(model, num_rows, pad_token_id, **kwargs)

    @abstractmethod
    def fits(self, decoder: RowDecoder) -> bool:
        """Whether ``decoder`` can step a model of this kind."""

    @abstractmethod
    def follow(
        self, decoder: RowDecoder, obs: dict[str, np.ndarray], last_actions: torch.Tensor | None
    ) -> None:
        """Bring ``decoder`` to the observations (HF layout): one cached step for each row that took its last
        action, a prefill for any other changed row (:func:`lm_gym.sampling.follow_arrays`,
        :func:`lm_gym.seq2seq.follow_seq2seq`)."""

    def last_tokens(self, obs: dict[str, np.ndarray], device: torch.device | None = None) -> torch.Tensor:
        """(N, 1) the last token of each row's text, the ``input_ids`` that logits processors see."""
        return last_tokens(obs[self.text_keys[0]], device)

    # ------------------------------------------------------------------------------------ teacher forcing
    @abstractmethod
    def sequences(
        self,
        obs: dict[str, np.ndarray],
        last_actions: np.ndarray,
        n_actions: Sequence[int],
        pad_token_id: int,
    ) -> dict[str, np.ndarray]:
        """Episode segments as whole sequences for one teacher-forced pass.

        Args:
            obs: the HF-layout observation arrays (B, L) of each segment's last step.
            last_actions: (B,) the action taken there.
            n_actions: the number of actions of each segment (the last tokens of its text).
            pad_token_id: the id written in padded positions.

        Returns:
            the model's ids and masks (the keys of :attr:`hf_keys`), and ``action_mask`` over the text, 1 on
            the tokens that were actions.
        """

    @abstractmethod
    def forward_inputs(self, batch: Any) -> dict[str, torch.Tensor]:
        """The model's inputs for a teacher-forced pass over ``batch`` (a
        :class:`~algorithms.common.buffer.SequenceBatch`, or anything with its sequence fields)."""

    def texts_with_actions(self, obs: dict[str, np.ndarray], last_actions: np.ndarray) -> list[np.ndarray]:
        """Each row's text (:attr:`text_keys`, its padding dropped) with its last action appended: a segment's
        last observation holds its whole prefix, so this is the whole sequence the segment's actions extend."""
        ids, mask = (obs[key] for key in self.text_keys)
        return [np.append(row[m > 0], action) for row, m, action in zip(ids, mask, last_actions)]

    def text(self, batch: Any) -> torch.Tensor:
        """(B, L) the text of ``batch``'s sequences, which its ``action_mask`` is over."""
        return getattr(batch, self.text_keys[0])

    @abstractmethod
    def last_hidden_states(self, out: Any) -> torch.Tensor:
        """(B, L, H) the last layer's hidden states over the text from a forward pass's output (run with
        ``output_hidden_states=True``)."""


class CausalKind(ModelKind):
    """A decoder-only LM: the prompt and the text are one left-padded sequence."""

    is_encoder_decoder = False
    description = "a causal"
    decoder_class = BatchedDecoder
    peft_task_type = None
    hf_keys = ("input_ids", "attention_mask")
    text_keys = ("input_ids", "attention_mask")

    def observation_space(self, vocab_size: int, max_prompt_tokens: int, max_new_tokens: int) -> spaces.Box:
        return token_observation_space(vocab_size, max_prompt_tokens + max_new_tokens)

    def position_lengths(self, max_prompt_tokens: int, max_new_tokens: int) -> list[tuple[str, int]]:
        prompt, new = max_prompt_tokens, max_new_tokens
        return [(f"max_prompt_tokens + max_new_tokens = {prompt} + {new}", prompt + new)]

    def observation_widths(self, max_prompt_tokens: int, max_new_tokens: int) -> dict[str, int]:
        width = max_prompt_tokens + max_new_tokens
        return {"input_ids": width, "attention_mask": width}

    def write_observation_row(
        self,
        obs: dict[str, np.ndarray],
        row: int,
        seq: Sequence[int],
        prompt_len: int,
        pad_token_id: int,
        decoder: RowDecoder,
    ) -> None:
        _write_right(obs["input_ids"], obs["attention_mask"], row, seq, pad_token_id)

    def fits(self, decoder: RowDecoder) -> bool:
        # any but the encoder-decoder's: the env steps a causal reference by the RowDecoder protocol
        return not isinstance(decoder, Seq2SeqDecoder)

    def follow(
        self, decoder: RowDecoder, obs: dict[str, np.ndarray], last_actions: torch.Tensor | None
    ) -> None:
        follow_arrays(decoder, obs, last_actions)

    def sequences(
        self,
        obs: dict[str, np.ndarray],
        last_actions: np.ndarray,
        n_actions: Sequence[int],
        pad_token_id: int,
    ) -> dict[str, np.ndarray]:
        seqs = self.texts_with_actions(obs, last_actions)
        width = max(len(s) for s in seqs)
        ids = np.full((len(seqs), width), pad_token_id, dtype=np.int64)  # (B, L) left-padded
        mask = np.zeros((len(seqs), width), dtype=np.int64)
        action_mask = np.zeros((len(seqs), width), dtype=np.int64)
        for i, (seq, k) in enumerate(zip(seqs, n_actions)):
            ids[i, width - len(seq) :], mask[i, width - len(seq) :] = seq, 1
            action_mask[i, width - k :] = 1
        return {"input_ids": ids, "attention_mask": mask, "action_mask": action_mask}

    def forward_inputs(self, batch: Any) -> dict[str, torch.Tensor]:
        # left padding: each row's positions count its own tokens, as in the KV-cached rollout
        positions = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, L)
        return {
            "input_ids": batch.input_ids,
            "attention_mask": batch.attention_mask,
            "position_ids": positions,
        }

    def last_hidden_states(self, out: Any) -> torch.Tensor:
        return out.hidden_states[-1]


class Seq2SeqKind(ModelKind):
    """An encoder-decoder LM: the prompt is the encoder's source, the text the decoder's sequence."""

    is_encoder_decoder = True
    description = "an encoder-decoder"
    decoder_class = Seq2SeqDecoder
    peft_task_type = "SEQ_2_SEQ_LM"
    hf_keys = ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask")
    text_keys = ("decoder_input_ids", "decoder_attention_mask")

    def observation_space(self, vocab_size: int, max_prompt_tokens: int, max_new_tokens: int) -> spaces.Box:
        return seq2seq_observation_space(vocab_size, max_prompt_tokens, max_new_tokens + 1)

    def position_lengths(self, max_prompt_tokens: int, max_new_tokens: int) -> list[tuple[str, int]]:
        # the encoder reads the prompt; the decoder, its start token and the text
        return [("max_prompt_tokens", max_prompt_tokens), ("max_new_tokens + 1", max_new_tokens + 1)]

    def observation_widths(self, max_prompt_tokens: int, max_new_tokens: int) -> dict[str, int]:
        source, text = max_prompt_tokens, max_new_tokens + 1
        return {
            "input_ids": source,
            "attention_mask": source,
            "decoder_input_ids": text,
            "decoder_attention_mask": text,
        }

    def write_observation_row(
        self,
        obs: dict[str, np.ndarray],
        row: int,
        seq: Sequence[int],
        prompt_len: int,
        pad_token_id: int,
        decoder: RowDecoder,
    ) -> None:
        # the source at the left end; the decoder start token and the generated tokens at the right end
        ids, mask = obs["input_ids"], obs["attention_mask"]
        source = seq[:prompt_len]
        ids[row], mask[row] = pad_token_id, 0
        ids[row, : len(source)], mask[row, : len(source)] = source, 1
        text = [decoder.decoder_start_token_id, *seq[prompt_len:]] if seq else []
        _write_right(obs["decoder_input_ids"], obs["decoder_attention_mask"], row, text, pad_token_id)

    def fits(self, decoder: RowDecoder) -> bool:
        return isinstance(decoder, Seq2SeqDecoder)

    def follow(
        self, decoder: RowDecoder, obs: dict[str, np.ndarray], last_actions: torch.Tensor | None
    ) -> None:
        follow_seq2seq(decoder, obs, last_actions)

    def sequences(
        self,
        obs: dict[str, np.ndarray],
        last_actions: np.ndarray,
        n_actions: Sequence[int],
        pad_token_id: int,
    ) -> dict[str, np.ndarray]:
        # the sources (B, S) and the decoder sequences (B, D), right-padded: the layout of teacher forcing, in
        # which positions are exact for any decoder
        sources = [ids[mask > 0] for ids, mask in zip(obs["input_ids"], obs["attention_mask"])]
        seqs = self.texts_with_actions(obs, last_actions)
        ids, mask = _right_pad(sources, pad_token_id)
        decoder_ids, decoder_mask = _right_pad(seqs, pad_token_id)
        action_mask = np.zeros_like(decoder_mask)
        for i, (seq, k) in enumerate(zip(seqs, n_actions)):
            action_mask[i, len(seq) - k : len(seq)] = 1
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "decoder_input_ids": decoder_ids,
            "decoder_attention_mask": decoder_mask,
            "action_mask": action_mask,
        }

    def forward_inputs(self, batch: Any) -> dict[str, torch.Tensor]:
        return {
            "input_ids": batch.input_ids,
            "attention_mask": batch.attention_mask,
            "decoder_input_ids": batch.decoder_input_ids,
            "decoder_attention_mask": batch.decoder_attention_mask,
        }

    def last_hidden_states(self, out: Any) -> torch.Tensor:
        return out.decoder_hidden_states[-1]


CAUSAL = CausalKind()
SEQ2SEQ = Seq2SeqKind()


def model_kind(model: torch.nn.Module) -> ModelKind:
    """The kind of ``model`` (a ``transformers`` or peft model): :data:`SEQ2SEQ` for an encoder-decoder
    (``config.is_encoder_decoder``), else :data:`CAUSAL`."""
    return SEQ2SEQ if is_encoder_decoder(model) else CAUSAL


def load_lm(name: str, **kwargs: Any) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal or an encoder-decoder LM and its tokenizer by name (``"tiny"``, ``"tiny-t5"``,
    ``"smollm2-135m"``, a folder or a Hub id), with the loader of :mod:`lm_gym.models` its config asks for;
    ``kwargs`` are the loaders' (``device``, ``dtype``, ``trust_remote_code``, ``seed``)."""
    seq2seq = is_seq2seq_lm(name, kwargs.get("trust_remote_code", False))
    return (load_seq2seq_lm if seq2seq else load_causal_lm)(name, **kwargs)


def _write_right(
    ids: np.ndarray, mask: np.ndarray, row: int, tokens: Sequence[int], pad_token_id: int
) -> None:
    """Rewrite ``row`` of ``ids``/``mask`` (N, T) with ``tokens`` at the right end, padding on the left."""
    ids[row], mask[row] = pad_token_id, 0
    if tokens:
        ids[row, ids.shape[1] - len(tokens) :] = tokens
        mask[row, ids.shape[1] - len(tokens) :] = 1


def _right_pad(rows: list[np.ndarray], pad_token_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token arrays -> (ids, mask), both (B, max length), right-padded."""
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_token_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = row, 1
    return ids, mask
