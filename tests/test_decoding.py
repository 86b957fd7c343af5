"""BatchedDecoder: incremental KV-cached logits equal a full forward of each row alone."""

import copy

import numpy as np
import pytest
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


def test_twin_rows_need_plain_lora(tiny):
    from peft import LoraConfig, get_peft_model

    model, tokenizer = tiny
    dora = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match="plain LoRA layers for adapter 'default'"):
        BatchedDecoder(dora, 2, tokenizer.pad_token_id, twin_adapter="default")


def test_twin_rows_run_reference_and_lora_policy_in_one_batch(tiny):
    from peft import LoraConfig, get_peft_model

    model, tokenizer = tiny
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
    policy = get_peft_model(copy.deepcopy(model), lora).eval()
    dec = BatchedDecoder(policy, 2, tokenizer.pad_token_id, twin_adapter="default")
    seqs = [[72, 101, 108], [65, 32, 98, 105, 103]]
    dec.reset_rows([0, 1], seqs)
    for step in range(5):
        for i in range(2):
            with policy.disable_adapter():
                torch.testing.assert_close(dec.logits[i], full_logits(policy, seqs[i]), atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(dec.twin_logits[i], full_logits(policy, seqs[i]), atol=1e-4, rtol=1e-4)
        tokens = torch.tensor([40 + step, 50 + step])
        dec.append(tokens, torch.tensor([True, step != 2]))
        for i in range(2):
            if i == 0 or step != 2:
                seqs[i].append(int(tokens[i]))
        if step == 3:
            dec.reset_rows([1], [[99, 100]])
            seqs[1] = [99, 100]
    assert (dec.logits - dec.twin_logits).abs().max() > 1e-3  # the adapter does change the policy


def test_keep_hidden_matches_full_forward(tiny):
    model, tokenizer = tiny
    dec = BatchedDecoder(model, 2, tokenizer.pad_token_id, keep_hidden=True)
    seqs = [[72, 101], [65, 32, 98, 105]]
    dec.reset_rows([0, 1], seqs)
    dec.append(torch.tensor([7, 8]), torch.tensor([True, False]))
    seqs[0].append(7)
    dec.reset_rows([1], [[9, 10, 11]])
    seqs[1] = [9, 10, 11]
    for i in range(2):
        with torch.no_grad():
            full = model(input_ids=torch.tensor([seqs[i]]), output_hidden_states=True).hidden_states[-1][
                0, -1
            ]
        torch.testing.assert_close(dec.hidden[i], full, atol=1e-4, rtol=1e-4)
