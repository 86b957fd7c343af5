"""LMActorCriticPolicy: rollout log-probs/values equal the teacher-forced ones; LoRA reference; export."""

import copy

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from algorithms.common.buffer import RolloutBuffer, SequenceBatch
from algorithms.policy import LMActorCriticPolicy
from lm_gym.env import TextGenVectorEnv
from lm_gym.spaces import hf_inputs


def sequences(input_ids, attention_mask, action_mask, **kwargs):
    """A :class:`SequenceBatch` of hand-made sequences for ``evaluate_actions`` (the per-action arrays, which
    it does not read, zero)."""
    zeros = torch.zeros(int(action_mask[:, 1:].sum()))
    return SequenceBatch(input_ids, attention_mask, action_mask, zeros, zeros, zeros, zeros, **kwargs)


def rollout(policy, toy_task, steps=6, n=3, seed=0):
    """Run the policy's rollout agent in the env; return the filled buffer. With LoRA the env steps the
    shared pass (algorithms.shared_pass) as its reference and the agent reads the policy's rows of it."""
    pad = policy.tokenizer.pad_token_id
    reference, shared = policy.env_reference(n)
    envs = TextGenVectorEnv(
        n,
        model=reference,
        tokenizer=policy.tokenizer,
        task=toy_task,
        max_new_tokens=steps,
        max_prompt_tokens=80,
        temperature=policy.temperature,
        reference_decoder=shared,
        autoreset_mode="SameStep",
    )
    agent = policy.rollout_agent(n, torch.Generator().manual_seed(seed), shared)
    buffer = RolloutBuffer(steps, n, 80 + steps)
    obs, _ = envs.reset(seed=seed)
    for t in range(steps):
        obs = hf_inputs(obs, pad)
        actions, log_probs, values = agent.act(obs)
        next_obs, rewards, term, trunc, _ = envs.step(actions)
        buffer.add(t, obs, actions, log_probs, values, rewards, term | trunc)
        obs = next_obs
    envs.close()
    return buffer


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"temperature": 0.7, "top_k": 20, "top_p": 0.9},
        {"lora_r": 4, "top_p": 0.8},
        {"separate_critic": True, "top_k": 50},
    ],
)
def test_rollout_log_probs_and_values_equal_evaluate_actions(tiny, toy_task, kwargs):
    model, tokenizer = tiny
    policy = LMActorCriticPolicy(copy.deepcopy(model), tokenizer, **kwargs)
    torch.nn.init.normal_(policy.value_head.weight, std=0.1)  # a non-trivial critic
    buffer = rollout(policy, toy_task)
    buffer.advantages = buffer.returns = np.zeros_like(buffer.rewards)
    batch = next(buffer.minibatches(100, np.random.default_rng(0), policy.device, tokenizer.pad_token_id))
    with torch.no_grad():
        log_prob, entropy, values = policy.evaluate_actions(batch)
    assert log_prob.shape == (buffer.n_steps * buffer.n_envs,)
    # measured: |diff| <= 7.2e-07 (relative 4.2e-07) under 4 CPU kernel settings (docs/testing.md)
    torch.testing.assert_close(log_prob, batch.old_log_prob, atol=1e-4, rtol=1e-4)
    # measured: |diff| <= 7.5e-07 (relative 3.4e-05) under 4 CPU kernel settings (docs/testing.md)
    torch.testing.assert_close(values, batch.old_values, atol=1e-4, rtol=1e-4)
    assert (entropy >= 0).all()
    assert entropy.max() < np.log(len(tokenizer))  # the law of a seeded random model is not uniform


def test_lora_reference_is_the_model_with_adapters_off(tiny):
    model, tokenizer = tiny
    policy = LMActorCriticPolicy(copy.deepcopy(model), tokenizer, lora_r=4)
    with torch.no_grad():
        for p in policy.model.parameters():
            if p.requires_grad:
                p.add_(0.05)  # move the adapters
        ids = torch.tensor([[72, 101, 108, 108, 111]])
        with policy.reference() as reference:
            ref_logits = reference(input_ids=ids).logits
        # measured: equal under 4 CPU kernel settings (docs/testing.md)
        torch.testing.assert_close(ref_logits, model(input_ids=ids).logits)
        assert not torch.allclose(policy.model(input_ids=ids).logits, ref_logits)
    trainable = policy.trainable_state_dict()
    assert all("lora" in k or "value_head" in k for k in trainable)


def test_export_loads_with_plain_transformers(tiny, tmp_path):
    model, tokenizer = tiny
    for lora_r in (0, 4):
        policy = LMActorCriticPolicy(copy.deepcopy(model), tokenizer, lora_r=lora_r)
        with torch.no_grad():
            next(p for p in policy.model.parameters() if p.requires_grad).add_(0.1)
        policy.save_pretrained(tmp_path / str(lora_r))
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / str(lora_r))
        ids = torch.tensor([[72, 101, 108]])
        with torch.no_grad():
            # measured: equal under 4 CPU kernel settings (docs/testing.md)
            torch.testing.assert_close(loaded(input_ids=ids).logits, policy.model(input_ids=ids).logits)
        assert (tmp_path / str(lora_r) / "model.safetensors").exists()
        assert (tmp_path / str(lora_r) / "value_head.safetensors").exists()


def test_bad_policy_arguments(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="lora_r must be >= 0"):
        LMActorCriticPolicy(model, tokenizer, lora_r=-1)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        LMActorCriticPolicy(model, tokenizer, top_p=1.5)


def test_gradient_checkpointing_gives_the_same_values_and_gradients(tiny):
    model, tokenizer = tiny
    ids = torch.tensor([[256, 72, 101, 108, 108, 111, 33], [256, 256, 87, 111, 119, 33, 33]])
    mask = (ids != 256).long()
    actions = torch.zeros_like(ids)
    actions[:, -3:] = 1
    results = []
    for checkpointing in (False, True):
        policy = LMActorCriticPolicy(copy.deepcopy(model), tokenizer, gradient_checkpointing=checkpointing)
        torch.manual_seed(0)
        torch.nn.init.normal_(policy.value_head.weight, std=0.1)
        log_prob, entropy, value = policy.evaluate_actions(sequences(ids, mask, actions))
        (log_prob.sum() + value.sum()).backward()
        grads = [p.grad.clone() for p in policy.model.parameters()]
        results.append((log_prob.detach(), value.detach(), grads))
        assert not policy.model.training  # back in eval mode for KV-cached sampling
    # measured: equal under 4 CPU kernel settings (docs/testing.md)
    torch.testing.assert_close(results[0][0], results[1][0])
    # measured: equal under 4 CPU kernel settings (docs/testing.md)
    torch.testing.assert_close(results[0][1], results[1][1])
    for a, b in zip(results[0][2], results[1][2]):
        # measured: equal under 4 CPU kernel settings (docs/testing.md)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
