"""Gradient checkpointing: the backward pass recomputes the layers, and nothing else changes (values, gradients,
TRPO's Fisher products), for the causal tiny model and tiny-t5."""

import copy

import numpy as np
import pytest
import torch
from transformers.modeling_layers import GradientCheckpointingLayer

from algorithms.policy import LMActorCriticPolicy
from algorithms.trpo import TRPO
from lm_gym.models import tiny_seq2seq_lm
from tests.algorithms.test_policy import rollout, sequences
from tests.toys import toy_algo


@pytest.fixture(scope="module")
def t5():
    model, tokenizer = tiny_seq2seq_lm(seed=0)
    return model.requires_grad_(False), tokenizer


def count_layer_runs(model: torch.nn.Module) -> dict[str, int]:
    """How many times each layer's MLP starts, by name, from now on. A forward *pre*-hook on a module inside the
    layer: transformers checkpoints the layer's ``forward`` (so the layer's own hooks run once), and torch stops a
    recomputation as soon as the last activation it needs is rebuilt (so a post-hook on the MLP would miss it)."""
    counts = {}
    for name, module in model.named_modules():
        # Llama's decoder layers; T5's encoder and decoder blocks
        if name.split(".")[-1] in ("mlp", "DenseReluDense"):
            counts[name] = 0
            module.register_forward_pre_hook(
                lambda m, args, name=name: counts.__setitem__(name, counts[name] + 1)
            )
    assert counts
    return counts


def causal_batch():
    ids = torch.tensor([[256, 72, 101, 108, 108, 111, 33], [256, 256, 87, 111, 119, 33, 33]])
    actions = torch.zeros_like(ids)
    actions[:, -3:] = 1
    return sequences(ids, (ids != 256).long(), actions)


def seq2seq_batch():
    source = torch.tensor([[72, 101, 108, 108, 111, 33], [87, 111, 119, 33, 256, 256]])
    decoder = torch.tensor([[256, 10, 11, 12, 13], [256, 20, 21, 256, 256]])
    decoder_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    actions = decoder_mask.clone()
    actions[:, 0] = 0
    return sequences(
        source,
        (source != 256).long(),
        actions,
        decoder_input_ids=decoder,
        decoder_attention_mask=decoder_mask,
    )


@pytest.mark.parametrize("settings", [{}, {"lora_r": 4}, {"separate_critic": True}])
@pytest.mark.parametrize("name", ["tiny", "tiny-t5"])
def test_backward_recomputes_the_layers_and_changes_nothing_else(tiny, t5, name, settings):
    model, tokenizer = tiny if name == "tiny" else t5
    batch = causal_batch() if name == "tiny" else seq2seq_batch()
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the LoRA adapters
        policy = LMActorCriticPolicy(
            copy.deepcopy(model), tokenizer, gradient_checkpointing=checkpointing, **settings
        )
        torch.nn.init.normal_(policy.value_head.weight, std=0.1)  # a non-trivial critic
        trunks = [policy.model] + ([policy.critic_trunk] if policy.critic_trunk is not None else [])
        counts = [count_layer_runs(trunk) for trunk in trunks]
        log_prob, entropy, value = policy.evaluate_actions(batch)
        assert all(n == 1 for c in counts for n in c.values())
        (log_prob.sum() + entropy.sum() + value.sum()).backward()
        # checkpointed: each layer of the actor (and of the separate critic) runs again in the backward pass
        assert all(n == (2 if checkpointing else 1) for c in counts for n in c.values()), counts
        # the layers (what the policy switches to train mode) are back in eval mode for KV-cached sampling
        assert not any(
            m.training for t in trunks for m in t.modules() if isinstance(m, GradientCheckpointingLayer)
        )
        grads = {k: p.grad for k, p in policy.named_parameters() if p.requires_grad}
        results.append((log_prob.detach(), entropy.detach(), value.detach(), grads))
    (log_prob, entropy, value, grads), (ck_log_prob, ck_entropy, ck_value, ck_grads) = results
    # measured: equal (|diff| = 0) under 4 CPU kernel settings (docs/testing.md)
    torch.testing.assert_close(ck_log_prob, log_prob)
    # measured: equal (|diff| = 0) under 4 CPU kernel settings (docs/testing.md)
    torch.testing.assert_close(ck_entropy, entropy)
    # measured: equal (|diff| = 0) under 4 CPU kernel settings (docs/testing.md)
    torch.testing.assert_close(ck_value, value)
    assert ck_grads.keys() == grads.keys()
    for key, grad in grads.items():
        # measured: equal (|diff| = 0) under 4 CPU kernel settings (docs/testing.md)
        torch.testing.assert_close(ck_grads[key], grad, msg=key)


def test_train_mode_only_with_gradients_and_sampling_stays_cached(tiny, toy_task):
    """The layers switch to train mode (what makes transformers checkpoint) only in a forward pass with autograd
    on; without it (pi_old, the rollout's KV-cached sampling) they stay in eval mode, and the rollout's log-probs
    and values still equal the teacher-forced ones."""
    model, tokenizer = tiny
    policy = LMActorCriticPolicy(copy.deepcopy(model), tokenizer, gradient_checkpointing=True)
    torch.nn.init.normal_(policy.value_head.weight, std=0.1)
    modes = []
    for layer in policy.model.model.layers:
        layer.register_forward_pre_hook(lambda m, args: modes.append(m.training))
    with torch.no_grad():
        policy.evaluate_actions(causal_batch())
    assert modes == [False, False]
    log_prob, _, value = policy.evaluate_actions(causal_batch())
    assert modes[2:] == [True, True]
    (log_prob.sum() + value.sum()).backward()
    del modes[:]
    buffer = rollout(policy, toy_task)  # KV-cached; the cache would be dropped in train mode
    assert modes and not any(modes)
    batch = next(buffer.minibatches(100, np.random.default_rng(0), policy.device, tokenizer.pad_token_id))
    log_prob, _, value = policy.evaluate_actions(batch)
    # measured: |diff| <= 4.8e-07 (relative 9.0e-08) under 4 CPU kernel settings (docs/testing.md)
    torch.testing.assert_close(log_prob.detach(), batch.old_log_prob, atol=1e-4, rtol=1e-4)
    # measured: |diff| <= 6.0e-07 (relative 2.3e-05) under 4 CPU kernel settings (docs/testing.md)
    torch.testing.assert_close(value.detach(), batch.old_values, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("batch_size", [8, 3])  # one minibatch (a cached first-derivative graph); several
@pytest.mark.parametrize("name", ["tiny", "tiny-t5"])
def test_trpo_step_is_the_same_with_checkpointing(tiny, t5, name, batch_size):
    """TRPO's Fisher products differentiate twice through the checkpointed layers: same step, layers recomputed."""
    model, tokenizer = tiny if name == "tiny" else t5
    steps, runs = [], []
    for checkpointing in (False, True):
        algo = toy_algo(
            TRPO,
            (model, tokenizer),
            gradient_checkpointing=checkpointing,
            batch_size=batch_size,
            fisher_subsample=0.5 if batch_size < 8 else 1.0,
        )
        policy = algo.policy
        algo.collect_rollouts()
        counts = count_layer_runs(policy.model)
        start = torch.cat([p.detach().flatten() for p in policy.model.parameters()])
        algo.train()
        assert algo.logger.values["train/step_accepted"] == 1.0
        steps.append(torch.cat([p.detach().flatten() for p in policy.model.parameters()]) - start)
        runs.append(sum(counts.values()))
    assert runs[1] > runs[0], runs  # the backward passes recomputed the layers
    # measured: equal (|diff| = 0) under 4 CPU kernel settings (docs/testing.md)
    torch.testing.assert_close(steps[1], steps[0])
