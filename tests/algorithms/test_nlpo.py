"""NLPO: the top-p mask processor, masks in rollouts and in the ratio, refreshes, learning, resume, LoRA."""

import numpy as np
import pytest
import torch

from algorithms.nlpo import NLPO, TopPMaskLogitsProcessor
from tests.learning import INITIAL_MAX, THRESHOLDS, run_toy
from tests.toys import toy_algo


def make_nlpo(tiny, **kwargs):
    return toy_algo(NLPO, tiny, **{"batch_size": 8, "n_epochs": 4, **kwargs})


def full_batch(algo):
    """The whole rollout as one teacher-forced batch (actions in ``in_batch_order`` order)."""
    return algo.buffer.batch(algo.buffer.segments(), algo.policy.device, algo.policy.tokenizer.pad_token_id)


def in_batch_order(algo, array):
    """A (T, N) rollout array in the order of ``full_batch``'s actions."""
    return np.concatenate([array[first : last + 1, env] for env, first, last in algo.buffer.segments()])


def mask_policy_probs(algo, batch):
    """(M, V) the masking policy's law at every action of ``batch``, from one teacher-forced pass."""
    rows, cols = batch.action_mask[:, 1:].nonzero(as_tuple=True)
    positions = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    with algo.mask_policy() as model:
        logits = model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=positions
        ).logits[rows, cols]
    return logits.float().softmax(-1)


def masks_from(algo, probs):
    return TopPMaskLogitsProcessor(
        algo.mask_processor.top_p, algo.mask_processor.min_tokens_to_keep
    ).set_mask(probs.log())


def test_processor_keeps_the_smallest_set_reaching_top_p():
    torch.manual_seed(1)
    logits = torch.randn(6, 300) * torch.tensor([0.1, 1.0, 3.0, 6.0, 10.0, 30.0])[:, None]
    processor = TopPMaskLogitsProcessor(top_p=0.8, min_tokens_to_keep=20)
    keep = processor.set_mask(logits)
    probs = logits.softmax(-1)
    for row in range(len(logits)):
        kept = probs[row][keep[row]]
        assert kept.sum() >= 0.8 - 1e-5
        assert len(kept) >= 20
        # no token outside is more likely than one inside, and one token fewer would miss top_p or the minimum
        assert probs[row][~keep[row]].max() <= kept.min()
        assert len(kept) == 20 or kept.sum() - kept.min() < 0.8
    # the flat rows need many tokens, the peaked ones only the minimum
    assert keep[0].sum() > 200 and keep[-1].sum() == 20
    scores = torch.randn(6, 300)
    masked = processor(None, scores)
    assert torch.equal(masked[keep], scores[keep]) and torch.isinf(masked[~keep]).all()
    # a minimum above the vocabulary keeps everything
    assert TopPMaskLogitsProcessor(0.5, 1000).set_mask(logits).all()
    with pytest.raises(RuntimeError, match="set_mask"):
        TopPMaskLogitsProcessor()(None, scores)


def test_rollout_masks_hold_the_actions_and_enter_the_ratio(tiny):
    algo = make_nlpo(tiny, mask_top_p=0.5, min_tokens_to_keep=10)
    stats = algo.collect_rollouts()["stats"]
    buffer = algo.buffer
    masks = buffer.action_masks  # (T, N, V)
    assert masks.shape == (algo.n_steps, algo.n_envs, 257)
    # (2) every action lies inside its stored mask
    assert np.take_along_axis(masks, buffer.actions[..., None], axis=-1).all()
    # (1) on real rollouts: the kept set has >= top_p of the masking policy's mass and >= the minimum
    batch = full_batch(algo)
    kept = batch.action_masks  # (M, V) in action order
    assert (kept.sum(-1) >= 10).all()
    probs = mask_policy_probs(algo, batch)
    assert ((probs * kept).sum(-1) >= 0.5 - 1e-4).all()
    assert (kept == masks_from(algo, probs)).float().mean() > 0.999  # cached vs teacher-forced numerics
    # measured: equal under 4 CPU kernel settings (docs/testing.md)
    assert stats["rollout/mask_tokens"] == pytest.approx(masks.sum(-1).mean())
    assert 0.5 <= stats["rollout/mask_mass"] < 0.9
    # the ratio's new log-probs are of the same masked law as the stored ones: ratio 1 before any update
    with torch.no_grad():
        masked, _, _ = algo.policy.evaluate_actions(batch)  # the batch carries the masks
        unmasked, _, _ = algo.policy.evaluate_actions(batch._replace(action_masks=None))
    # measured: |diff| <= 4.8e-07 (relative 1.3e-07) under 4 CPU kernel settings (docs/testing.md)
    torch.testing.assert_close(masked, batch.old_log_prob, atol=1e-4, rtol=0)
    assert (masked - unmasked > 0.1).all()  # the mask removed mass, so renormalizing raised every log-prob
    algo.close()


def test_env_kl_uses_the_unmasked_log_probs(tiny):
    """The reference is the initial policy, so at iteration 0 the unmasked KL is 0 at every step; the
    masked log-probs would give a KL of -log(kept mass) > 0."""
    algo = make_nlpo(
        tiny, reward=lambda p, c: [0.0] * len(c), kl_coef=1.0, mask_top_p=0.5, min_tokens_to_keep=10
    )
    told = []  # the log pi of the agent's half of the KL penalty, step by step
    act = algo._act
    algo._act = lambda agent, obs: (step := act(agent, obs), told.append(step.kl_log_probs.numpy().copy()))[0]
    algo.collect_rollouts()
    told = np.stack(told)  # (T, N)
    buffer = algo.buffer
    assert (buffer.log_probs - told > 0.1).all()  # the buffer has the masked law's log-probs
    # measured: equal under 3 CPU kernel settings (docs/testing.md)
    np.testing.assert_allclose(buffer.rewards, 0.0, atol=1e-4)  # the KL penalty: unmasked vs reference
    batch = full_batch(algo)
    with torch.no_grad():
        unmasked, _, _ = algo.policy.evaluate_actions(batch._replace(action_masks=None))
    # measured: |diff| <= 9.5e-07 (relative 1.7e-07) under 3 CPU kernel settings (docs/testing.md)
    np.testing.assert_allclose(in_batch_order(algo, told), unmasked.numpy(), atol=1e-4)
    algo.close()


def test_masking_policy_is_refreshed_and_builds_the_next_masks(tiny):
    algo = make_nlpo(tiny, mask_update_every=2, mask_top_p=0.5, min_tokens_to_keep=10)
    actor = algo._actor_params
    initial = {k: v.clone() for k, v in algo.mask_weights.items()}
    algo.learn(2)  # iterations 0 and 1: masks of the initial model
    for name, value in algo.mask_weights.items():
        assert torch.equal(value, initial[name])
    assert any(not torch.equal(actor[name], initial[name]) for name in actor)  # the policy has moved
    old_masks = full_batch(algo).action_masks
    assert (old_masks == masks_from(algo, mask_policy_probs(algo, full_batch(algo)))).float().mean() > 0.999

    at_refresh = {k: v.detach().clone() for k, v in actor.items()}
    algo.learn(3)  # iteration 2 refreshes from the policy as it is now, then updates the policy
    for name, value in algo.mask_weights.items():
        assert torch.equal(value, at_refresh[name])
    assert any(not torch.equal(actor[name], at_refresh[name]) for name in actor)
    batch = full_batch(algo)  # iteration 2's rollout
    refreshed = masks_from(algo, mask_policy_probs(algo, batch))
    assert (batch.action_masks == refreshed).float().mean() > 0.999  # built by the refreshed copy ...
    algo.mask_weights = initial
    stale = masks_from(algo, mask_policy_probs(algo, batch))
    assert (refreshed != stale).any(-1).float().mean() > 0.3  # ... which differs from the initial model's
    for name in actor:  # the swaps left the policy's own weights in place
        assert not torch.equal(actor[name], initial[name])
    algo.close()


@pytest.mark.learning
def test_nlpo_raises_the_toy_reward(tiny):
    initial, rise, algo = run_toy(
        "nlpo", tiny
    )  # the paper's mask: top-p 0.9, >= 100 tokens, refreshed every 5
    assert initial < INITIAL_MAX, f"the untrained model's first rollout scored {initial:.3f}"
    assert rise > THRESHOLDS["nlpo"], f"score rose by {rise:+.3f}, needed > {THRESHOLDS['nlpo']}"
    assert {"rollout/mask_tokens", "rollout/mask_mass", "train/approx_kl"} <= set(algo.logger.history[-1])


def test_same_seed_same_run_and_resume_equals_uninterrupted(tiny, tmp_path):
    settings = dict(mask_update_every=2, mask_top_p=0.5, min_tokens_to_keep=10, checkpoint_every=3)
    whole = make_nlpo(tiny, run_dir=tmp_path / "whole", **settings)
    whole.learn(5)
    again = make_nlpo(tiny, **settings)
    again.learn(5)
    for a, b in zip(whole.policy.parameters(), again.policy.parameters()):
        assert torch.equal(a, b)

    # the checkpoint after iteration 3 holds the masking policy of iteration 2: iteration 3 needs it
    first = make_nlpo(tiny, run_dir=tmp_path / "resumed", **settings)
    first.learn(3)
    assert (tmp_path / "resumed" / "checkpoints" / "iter_000003" / "mask_policy.safetensors").exists()
    resumed = make_nlpo(tiny, run_dir=tmp_path / "resumed", **settings)
    resumed.load_checkpoint(tmp_path / "resumed")
    for name, value in resumed.mask_weights.items():
        assert torch.equal(value, first.mask_weights[name])
    resumed.learn(5)
    for a, b in zip(whole.policy.parameters(), resumed.policy.parameters()):
        assert torch.equal(a, b)

    # without the saved masking policy (rebuilt from the resumed weights instead) the run would differ
    rebuilt = make_nlpo(tiny, run_dir=tmp_path / "rebuilt", **settings)
    rebuilt.load_checkpoint(tmp_path / "resumed" / "checkpoints" / "iter_000003")
    rebuilt.refresh_mask_policy()
    rebuilt.learn(4)
    assert any(not torch.equal(a, b) for a, b in zip(first.policy.parameters(), rebuilt.policy.parameters()))


def test_lora_masks_with_a_snapshot_of_the_adapters(tiny):
    algo = make_nlpo(
        tiny, lora_r=4, learning_rate=1e-2, mask_update_every=2, mask_top_p=0.5, min_tokens_to_keep=10
    )
    model = algo.policy.model
    base = {k: v.clone() for k, v in model.named_parameters() if not v.requires_grad}
    adapters = {k for k, v in model.named_parameters() if v.requires_grad}
    assert set(algo.mask_weights) == adapters and all("lora_" in k for k in adapters)  # no base copy
    algo.learn(3)
    stale = {k: v.clone() for k, v in algo.mask_weights.items()}  # refreshed at iteration 2
    live = dict(model.named_parameters())
    assert any(not torch.equal(live[k], stale[k]) for k in adapters)
    with algo.mask_policy():
        assert all(torch.equal(live[k], stale[k]) for k in adapters)
    assert any(not torch.equal(live[k], stale[k]) for k in adapters)  # swapped back

    stats = algo.collect_rollouts()["stats"]  # iteration 3, through the env's shared forward
    buffer, batch = algo.buffer, full_batch(algo)
    assert np.take_along_axis(buffer.action_masks, buffer.actions[..., None], axis=-1).all()
    assert (batch.action_masks == masks_from(algo, mask_policy_probs(algo, batch))).float().mean() > 0.999
    with torch.no_grad():
        masked, _, _ = algo.policy.evaluate_actions(batch)  # the batch carries the masks
    # measured: |diff| <= 4.8e-07 (relative 1.1e-07) under 4 CPU kernel settings (docs/testing.md)
    torch.testing.assert_close(masked, batch.old_log_prob, atol=1e-4, rtol=0)
    assert 0 < stats["rollout/mask_mass"] < 1  # the policy moved since the refresh: not always >= top_p
    for name, value in model.named_parameters():
        if name in base:
            assert torch.equal(value, base[name])
    algo.close()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mask_top_p": 0.0}, r"mask_top_p must be in \(0, 1\]"),
        ({"mask_top_p": 1.5}, r"mask_top_p must be in \(0, 1\]"),
        ({"min_tokens_to_keep": 0}, "min_tokens_to_keep must be an integer >= 1"),
        ({"min_tokens_to_keep": 2.5}, "min_tokens_to_keep must be an integer >= 1"),
        ({"mask_update_every": 0}, "mask_update_every must be an integer >= 1"),
        ({"clip_range": 1.5}, "clip_range must be in"),
    ],
)
def test_bad_arguments(tiny, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_nlpo(tiny, **kwargs)


def test_min_tokens_to_keep_above_the_vocabulary_warns(tiny):
    with pytest.warns(UserWarning, match="min_tokens_to_keep=1000 >= the vocabulary"):
        algo = make_nlpo(tiny, min_tokens_to_keep=1000)
    algo.collect_rollouts()
    assert algo.buffer.action_masks.all()
    algo.close()
