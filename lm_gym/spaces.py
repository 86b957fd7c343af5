"""The token observation space shared by the single and the vector environment."""

from __future__ import annotations

import numpy as np
from gymnasium import spaces

__all__ = ["token_observation_space"]


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
