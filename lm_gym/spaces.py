"""The token observation spaces shared by the single and the vector environment, and their HF layout.

An observation is one int64 array, so that code written for any Gymnasium environment can store it
(``torch.zeros((T, N) + space.shape)``, ``torch.as_tensor(obs)``, stable-baselines3's buffers): token ids,
and :data:`PAD` (-1, outside the vocabulary) where there is no token. :func:`hf_inputs` turns it (one
observation or a batch, numpy or torch) into the ``input_ids``/``attention_mask`` a Hugging Face model takes.
"""

from __future__ import annotations

import numpy as np
import torch
from gymnasium import spaces

__all__ = ["PAD", "hf_inputs", "pack_observation", "seq2seq_observation_space", "token_observation_space"]

PAD = -1  # the observation's value where there is no token (outside the vocabulary [0, V))


def token_observation_space(vocab_size: int, length: int) -> spaces.Box:
    """``Box(-1, vocab_size - 1, (length,), int64)``: the prompt and the tokens generated so far at the right
    end, :data:`PAD` (-1) on the left. Float32 (stable-baselines3's buffers) holds ids up to 2**24 exactly."""
    return spaces.Box(PAD, vocab_size - 1, shape=(length,), dtype=np.int64)


def seq2seq_observation_space(vocab_size: int, source_length: int, decoder_length: int) -> spaces.Box:
    """``Box(-1, vocab_size - 1, (2, W), int64)``, ``W = max(source_length, decoder_length)``: row 0 the
    encoder's source (the prompt), at the left end; row 1 the decoder prefix (the decoder start token, then
    the tokens generated so far), at the right end, so the last token is always at ``[1, -1]``. :data:`PAD`
    (-1) elsewhere."""
    return spaces.Box(PAD, vocab_size - 1, shape=(2, max(source_length, decoder_length)), dtype=np.int64)


def pack_observation(hf: dict[str, np.ndarray]) -> np.ndarray:
    """The inverse of :func:`hf_inputs`: ids where the attention mask is 1, :data:`PAD` elsewhere; an
    encoder-decoder's source and decoder prefix (left-aligned and right-aligned) stacked as (..., 2, W)."""
    if "decoder_input_ids" not in hf:
        return np.where(hf["attention_mask"] > 0, hf["input_ids"], PAD)
    source = np.where(hf["attention_mask"] > 0, hf["input_ids"], PAD)  # (..., S)
    decoder = np.where(hf["decoder_attention_mask"] > 0, hf["decoder_input_ids"], PAD)  # (..., D)
    width = max(source.shape[-1], decoder.shape[-1])
    pad = [(0, 0)] * (source.ndim - 1)
    source = np.pad(source, [*pad, (0, width - source.shape[-1])], constant_values=PAD)
    decoder = np.pad(decoder, [*pad, (width - decoder.shape[-1], 0)], constant_values=PAD)
    return np.stack([source, decoder], axis=-2)


def hf_inputs(
    obs: np.ndarray | torch.Tensor, pad_token_id: int = 0, *, encoder_decoder: bool = False
) -> dict[str, np.ndarray] | dict[str, torch.Tensor]:
    """An observation (L,) or a batch (N, L) -> ``{"input_ids", "attention_mask"}`` of the same shape, int64,
    numpy in, numpy out, torch in, torch out (floats, as stable-baselines3 stores observations, are rounded).

    With ``encoder_decoder``, an observation (2, W) or a batch (N, 2, W) -> ``input_ids``/``attention_mask``
    (the source, right-padded) and ``decoder_input_ids``/``decoder_attention_mask`` (left-padded), each (W,)
    or (N, W).

    Args:
        obs: the observation(s).
        pad_token_id: the id written where the mask is 0 (a model never attends there).
        encoder_decoder: the observation is an encoder-decoder's (:func:`seq2seq_observation_space`).
    """
    if isinstance(obs, torch.Tensor):
        ids = obs.round().long() if obs.is_floating_point() else obs.long()
        mask = (ids >= 0).long()
        ids = torch.where(mask > 0, ids, pad_token_id)
    else:
        ids = np.asarray(obs)
        ids = np.rint(ids).astype(np.int64) if ids.dtype.kind == "f" else ids.astype(np.int64, copy=False)
        mask = (ids >= 0).astype(np.int64)
        ids = np.where(mask > 0, ids, pad_token_id)
    if not encoder_decoder:
        return {"input_ids": ids, "attention_mask": mask}
    return {
        "input_ids": ids[..., 0, :],
        "attention_mask": mask[..., 0, :],
        "decoder_input_ids": ids[..., 1, :],
        "decoder_attention_mask": mask[..., 1, :],
    }
