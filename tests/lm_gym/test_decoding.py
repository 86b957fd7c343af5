"""BatchedDecoder: incremental KV-cached logits equal a full forward of each row alone; the LoRA shared pass
(algorithms.shared_pass): reference rows with the adapters off, twin rows with them on."""

import copy

import numpy as np
import pytest
import torch
from transformers.cache_utils import DynamicLayer

from algorithms.shared_pass import LoRASharedDecoder, shared_lora_decoder
from lm_gym.decoding import AppendLayer, BatchedDecoder


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
            # measured: |diff| <= 8.3e-07 (relative 2.1e-02) under 4 CPU kernel settings (docs/testing.md)
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


def test_append_layer_equals_concatenation_and_appends_in_place():
    torch.manual_seed(0)
    layer, plain = AppendLayer(), DynamicLayer()
    storages = []
    for step in range(100):
        keys, values = (
            torch.randn(2, 3, 5 if step == 0 else 1, 4),
            torch.randn(2, 3, 5 if step == 0 else 1, 4),
        )
        got, want = layer.update(keys, values), plain.update(keys, values)
        for a, b in zip(got, want):
            # measured: equal under 4 CPU kernel settings (docs/testing.md)
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        storages.append(layer.keys.untyped_storage().data_ptr())
        if step == 10:  # the owner trims the left columns: still a view of the buffer
            for cache in (layer, plain):
                cache.keys, cache.values = cache.keys[:, :, 3:], cache.values[:, :, 3:]
        if step == 20:  # the owner replaces the tensors (left padding): copied into a new buffer next step
            for cache in (layer, plain):
                cache.keys = torch.nn.functional.pad(cache.keys, (0, 0, 2, 0))
                cache.values = torch.nn.functional.pad(cache.values, (0, 0, 2, 0))
    assert len(set(storages[:21])) == 1  # 20 steps and a trim in the first buffer, no copy
    assert storages[21] != storages[20]  # the replaced tensor
    assert len(set(storages[21:])) == 2  # one more buffer once the first ran out of columns


def drive_twin_rows(dec, reference_logits, policy_logits):
    """Step two rows (one skipping a step, one restarted) through a decoder with twin rows, checking at every
    step its rows against ``reference_logits(seq)`` and its twin rows against ``policy_logits(seq)``; returns
    the final token lists."""
    seqs = [[72, 101, 108], [65, 32, 98, 105, 103]]
    dec.reset_rows([0, 1], seqs)
    for step in range(5):
        for i in range(2):
            # measured: |diff| <= 4.2e-07 (relative 3.4e-04) under 4 CPU kernel settings (docs/testing.md)
            torch.testing.assert_close(dec.logits[i], reference_logits(seqs[i]), atol=1e-4, rtol=1e-4)
            # measured: |diff| <= 5.4e-07 (relative 1.1e-03) under 4 CPU kernel settings (docs/testing.md)
            torch.testing.assert_close(dec.twin_logits[i], policy_logits(seqs[i]), atol=1e-4, rtol=1e-4)
        tokens = torch.tensor([40 + step, 50 + step])
        dec.append(tokens, torch.tensor([True, step != 2]))
        for i in range(2):
            if i == 0 or step != 2:
                seqs[i].append(int(tokens[i]))
        if step == 3:
            dec.reset_rows([1], [[99, 100]])
            seqs[1] = [99, 100]
    return seqs


def lora_policy(model):
    """A peft LoRA model of ``model`` whose adapters change its outputs (B initialised non-zero)."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
    return get_peft_model(copy.deepcopy(model), lora).eval()


def test_twin_rows_need_plain_lora(tiny):
    from peft import LoraConfig, get_peft_model

    model, tokenizer = tiny
    dora = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match="plain LoRA layers for adapter 'default'"):
        LoRASharedDecoder(dora, 2, tokenizer.pad_token_id, "default")
    with pytest.raises(ValueError, match="plain LoRA layers for adapter 'other'"):
        shared_lora_decoder(lora_policy(model), 2, tokenizer.pad_token_id, "other")  # no such adapter


def test_twin_rows_run_reference_and_lora_policy_in_one_batch(tiny):
    model, tokenizer = tiny
    policy = lora_policy(model)
    dec = shared_lora_decoder(policy, 2, tokenizer.pad_token_id, "default")
    assert isinstance(dec, LoRASharedDecoder)

    def reference_logits(seq):
        with policy.disable_adapter():
            return full_logits(policy, seq)

    seqs = drive_twin_rows(dec, reference_logits, lambda seq: full_logits(policy, seq))
    assert (dec.logits - dec.twin_logits).abs().max() > 1e-3  # the adapter does change the policy
    for i in range(2):  # the hidden states are the policy's (adapters on), for the value head
        with torch.no_grad():
            out = policy(input_ids=torch.tensor([seqs[i]]), output_hidden_states=True)
        # measured: |diff| <= 1.1e-06 (relative 2.6e-05) under 4 CPU kernel settings (docs/testing.md)
        torch.testing.assert_close(dec.hidden[i], out.hidden_states[-1][0, -1], atol=1e-4, rtol=1e-4)
    scaling = [m.scaling["default"] for m in policy.modules() if hasattr(m, "lora_B")]
    assert all(isinstance(s, float) for s in scaling)  # the per-row scales were put back after each pass


def test_twin_logits_and_hidden_need_twins_and_keep_hidden(tiny):
    model, tokenizer = tiny
    dec = BatchedDecoder(model, 2, tokenizer.pad_token_id)
    dec.reset_rows([0, 1], [[72, 101], [65]])
    with pytest.raises(RuntimeError, match="no twin rows"):
        _ = dec.twin_logits
    with pytest.raises(RuntimeError, match="does not keep hidden states"):
        _ = dec.hidden
    twins = BatchedDecoder(model, 2, tokenizer.pad_token_id, twins=True)  # no _pass_context: equal twins
    twins.reset_rows([0, 1], [[72, 101], [65]])
    twins.append(torch.tensor([7, 8]), torch.tensor([True, False]))
    assert twins.logits.shape == twins.twin_logits.shape == (2, len(tokenizer))
    # measured: |diff| <= 2.9e-07 (relative 1.9e-05) under 4 CPU kernel settings (docs/testing.md)
    torch.testing.assert_close(twins.twin_logits, twins.logits, atol=1e-5, rtol=1e-5)


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
        # measured: |diff| <= 8.3e-07 (relative 7.3e-06) under 4 CPU kernel settings (docs/testing.md)
        torch.testing.assert_close(dec.hidden[i], full, atol=1e-4, rtol=1e-4)


def test_follow_arrays_takes_the_decisions_of_follow(tiny):
    """The array fast path of the samplers: same steps, restarts and tokens as the token-list comparison."""
    from lm_gym.sampling import follow, follow_arrays, observed_sequences

    model, tokenizer = tiny
    rng = np.random.default_rng(1)
    n, width, pad = 5, 12, tokenizer.pad_token_id

    def observe(seqs):
        ids, mask = np.full((n, width), pad, dtype=np.int64), np.zeros((n, width), dtype=np.int64)
        for i, seq in enumerate(seqs):
            ids[i, width - len(seq) :], mask[i, width - len(seq) :] = seq, 1
        return {"input_ids": ids, "attention_mask": mask}

    calls = {"lists": [], "arrays": []}

    def spy(kind, name, method):
        def record(*args):
            calls[kind].append((name, [a.tolist() if torch.is_tensor(a) else list(a) for a in args]))
            return method(*args)

        return record

    decoders = {}
    for kind in calls:
        decoders[kind] = dec = BatchedDecoder(model, n, pad)
        for name in ("append", "reset_rows"):
            setattr(dec, name, spy(kind, name, getattr(dec, name)))
    seqs = [rng.integers(0, 256, size=int(rng.integers(1, 6))).tolist() for _ in range(n)]
    seqs[0] = rng.integers(0, 256, size=width - 1).tolist()  # fills the row after one step
    actions = None
    for step in range(14):
        obs = observe(seqs)
        follow(decoders["lists"], observed_sequences(obs), actions)
        follow_arrays(decoders["arrays"], obs, actions)
        assert calls["lists"] == calls["arrays"]
        assert decoders["lists"].tokens == decoders["arrays"].tokens == seqs
        # measured: equal under 4 CPU kernel settings (docs/testing.md)
        torch.testing.assert_close(decoders["lists"].logits, decoders["arrays"].logits)
        actions = torch.tensor(rng.integers(0, 256, size=n))
        for i in range(n):
            kind = rng.random() if i or step > 1 else (0.9, 0.1)[step]  # row 0: fill the row, then slide
            if len(seqs[i]) == width and kind < 0.5:  # a sliding window: the first token fell off
                seqs[i] = seqs[i][1:] + [int(actions[i])]
            elif len(seqs[i]) == width or kind < 0.15:  # a new episode
                seqs[i] = rng.integers(0, 256, size=int(rng.integers(1, 6))).tolist()
            elif kind < 0.3:  # the row did not move (an ended row)
                pass
            elif kind < 0.4:  # another token than the action: a restart on that text
                seqs[i] = seqs[i] + [(int(actions[i]) + 1) % 256]
            else:
                seqs[i] = seqs[i] + [int(actions[i])]
        if step == 9:  # the decoder changed behind the memo's back: the lists decide
            for dec in decoders.values():
                dec.reset_rows([1], [seqs[1]])


def test_decode_steps_with_the_4d_padding_mask_equal_the_2d_path(tiny):
    """The one-token steps pass their (rows, 1, 1, C) boolean padding mask to SDPA directly: bit for bit what
    transformers builds from the 2-D mask (with rows that skip steps, i.e. masked slots, and a restart)."""
    model, tokenizer = tiny
    rng = np.random.default_rng(2)
    decoders = [BatchedDecoder(model, 3, tokenizer.pad_token_id) for _ in range(2)]
    assert decoders[0]._padding_mask_4d
    decoders[1]._padding_mask_4d = False
    prompts = [rng.integers(0, 256, size=k).tolist() for k in (2, 7, 4)]
    for dec in decoders:
        dec.reset_rows(range(3), prompts)
    for step in range(12):
        tokens, active = torch.tensor(rng.integers(0, 256, size=3)), torch.tensor(rng.random(3) < 0.7)
        for dec in decoders:
            dec.append(tokens, active)
            if step == 5:
                dec.reset_rows([1], [[5, 6, 7, 8, 9, 10, 11, 12, 13]])
        assert torch.equal(decoders[0].logits, decoders[1].logits)


def test_categorical_draws_from_the_law_and_never_a_zero_probability_token():
    from lm_gym.sampling import categorical

    generator = torch.Generator().manual_seed(0)
    probs = torch.tensor([[0.5, 0.0, 0.25, 1e-3, 0.249, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 2.0]])
    n = 100_000
    draws = categorical(probs.repeat(n, 1), generator).view(n, 2)
    share = torch.bincount(draws[:, 0], minlength=6).double() / n
    # measured: |diff| <= 1.1e-03 (relative 1.2e-01) under 4 CPU kernel settings (docs/testing.md)
    torch.testing.assert_close(share, probs[0].double(), atol=0.006, rtol=0)  # ~4 standard errors
    assert (share[[1, 5]] == 0).all() and (draws[:, 1] == 5).all()  # unnormalized rows are fine
    again = categorical(probs.repeat(n, 1), torch.Generator().manual_seed(0)).view(n, 2)
    assert torch.equal(draws, again)  # seeded
    with pytest.raises(ValueError, match="nan"):
        categorical(torch.tensor([[0.5, float("nan")]]))
    with pytest.raises(ValueError, match="sums to 0"):
        categorical(torch.zeros(1, 3))
