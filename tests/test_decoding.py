"""BatchedDecoder: incremental KV-cached logits equal a full forward of each row alone."""

import numpy as np
import torch

from lm_gym.decoding import BatchedDecoder


def full_logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=torch.tensor([tokens])).logits[0, -1].float()


def test_incremental_logits_match_full_forward_across_resets(tiny):
    model, tokenizer = tiny
    rng = np.random.default_rng(0)
    n = 4
    dec = BatchedDecoder(model, n, tokenizer.pad_token_id)
    prompts = [rng.integers(0, 256, size=int(rng.integers(1, 12))).tolist() for _ in range(n)]
    dec.reset_rows(range(n), prompts)
    seqs = [list(p) for p in prompts]
    for step in range(30):
        for i in range(n):
            torch.testing.assert_close(dec.logits[i], full_logits(model, seqs[i]), atol=1e-4, rtol=1e-4)
        active = torch.tensor(rng.random(n) < 0.8)  # some rows skip a step (next-step autoreset)
        tokens = torch.tensor(rng.integers(0, 256, size=n))
        dec.append(tokens, active)
        for i in range(n):
            if active[i]:
                seqs[i].append(int(tokens[i]))
        # restart one or two rows on prompts of other lengths, sometimes longer than the cache
        if step % 4 == 3:
            rows = sorted(set(rng.integers(0, n, size=2).tolist()))
            new = [rng.integers(0, 256, size=int(rng.integers(1, 40))).tolist() for _ in rows]
            dec.reset_rows(rows, new)
            for r, p in zip(rows, new):
                seqs[r] = list(p)
        assert dec.mask.shape[1] <= max(len(s) for s in seqs) + 30  # trimmed, not growing without bound
        assert dec.mask.any(dim=0)[0]  # no all-padding column on the left
    assert not torch.isnan(dec.logits).any()
