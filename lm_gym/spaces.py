"""The token observation spaces shared by the single and the vector environment."""

from __future__ import annotations

import numpy as np
from gymnasium import spaces

__all__ = ["seq2seq_observation_space", "token_observation_space"]


def token_observation_space(vocab_size: int, length: int) -> spaces.Dict:
    """``Dict(input_ids=Box(0, vocab_size-1, (length,), int64), attention_mask=Box(0, 1, (length,), int64))``.

    Sequences are left-padded to ``length``: the prompt and the tokens generated so far fill the right end,
    ``attention_mask`` is 1 on them and 0 on padding. Fixed-size integer boxes are what stable-baselines3's
    rollout buffers store (it casts them to float32, which holds token ids up to 2**24 exactly).
    """
    return spaces.Dict(
        {
            "input_ids": spaces.Box(0, vocab_size - 1, shape=(length,), dtype=np.int64),
            "attention_mask": spaces.Box(0, 1, shape=(length,), dtype=np.int64),
        }
    )


def seq2seq_observation_space(vocab_size: int, source_length: int, decoder_length: int) -> spaces.Dict:
    """The observation of an encoder-decoder policy: the source and the decoder prefix, four int64 boxes.

    ``input_ids``/``attention_mask`` (``source_length``,): the encoded prompt, right-padded (the layout
    Hugging Face tokenizers give an encoder). ``decoder_input_ids``/``decoder_attention_mask``
    (``decoder_length``,): the decoder start token followed by the tokens generated so far, left-padded like
    the causal observation, so the last token is always at index -1.
    """
    box = lambda high, n: spaces.Box(0, high, shape=(n,), dtype=np.int64)  # noqa: E731
    return spaces.Dict(
        {
            "input_ids": box(vocab_size - 1, source_length),
            "attention_mask": box(1, source_length),
            "decoder_input_ids": box(vocab_size - 1, decoder_length),
            "decoder_attention_mask": box(1, decoder_length),
        }
    )
