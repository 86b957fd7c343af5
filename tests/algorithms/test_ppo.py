"""The on-policy core and PPO: GAE, learning on a toy reward, resume, the non-finite guard."""

import numpy as np
import pytest
import torch

from algorithms.common.buffer import compute_gae
from algorithms.common.on_policy import NonFiniteLossError
from algorithms.ppo import PPO, clipped_value_loss
from tests.learning import INITIAL_MAX, RUNS, THRESHOLDS, kl_gap, load_model, run_toy
from tests.toys import check_same_seed_and_resume, toy_algo


def make_ppo(tiny, **kwargs):
    return toy_algo(PPO, tiny, **{"batch_size": 8, "n_epochs": 4, **kwargs})


def test_gae_matches_hand_computed_returns():
    rng = np.random.default_rng(0)
    steps, envs, gamma, lam = 7, 3, 0.9, 0.8
    rewards, values = rng.normal(size=(steps, envs)), rng.normal(size=(steps, envs))
    dones = rng.random((steps, envs)) < 0.3
    last_values = rng.normal(size=envs)
    advantages, returns = compute_gae(rewards, values, dones.astype(float), last_values, gamma, lam)
    # definition: A_t = sum_k (gamma * lam)^k delta_{t+k}, summed until the episode ends
    for env in range(envs):
        for t in range(steps):
            total, factor = 0.0, 1.0
            for k in range(t, steps):
                next_value = (
                    0.0 if dones[k, env] else (values[k + 1, env] if k + 1 < steps else last_values[env])
                )
                total += factor * (rewards[k, env] + gamma * next_value - values[k, env])
                if dones[k, env]:
                    break
                factor *= gamma * lam
            # measured: equal under 4 CPU kernel settings (docs/testing.md)
            assert advantages[t, env] == pytest.approx(total)
    # measured: equal under 4 CPU kernel settings (docs/testing.md)
    np.testing.assert_allclose(returns, advantages + values)


@pytest.mark.learning
def test_ppo_raises_the_toy_reward(tiny):
    initial, rise, algo = run_toy("ppo", tiny)
    assert initial < INITIAL_MAX, f"the untrained model's first rollout scored {initial:.3f}"
    assert rise > THRESHOLDS["ppo"], f"score rose by {rise:+.3f}, needed > {THRESHOLDS['ppo']}"
    for key in (
        "train/policy_loss",
        "train/value_loss",
        "train/approx_kl",
        "train/clip_fraction",
        "train/explained_variance",
        "train/kl_coef",
        "rollout/kl",
        "rollout/entropy",
        "time/tokens_per_s",
    ):
        assert key in algo.logger.history[-1]


@pytest.mark.learning
def test_ppo_with_lora_raises_the_toy_reward_and_keeps_the_base():
    model = load_model(RUNS["ppo_lora"].model)
    base = {k: v.clone() for k, v in model[0].named_parameters()}
    initial, rise, algo = run_toy("ppo_lora", model)
    assert initial < INITIAL_MAX, f"the untrained model's first rollout scored {initial:.3f}"
    assert rise > THRESHOLDS["ppo_lora"], f"score rose by {rise:+.3f}, needed > {THRESHOLDS['ppo_lora']}"
    trained = dict(algo.policy.model.get_base_model().named_parameters())  # the base, adapters injected
    frozen = {n.replace(".base_layer", ""): v for n, v in trained.items() if "lora_" not in n}
    assert frozen.keys() == base.keys() and any("lm_head.lora_B" in n for n in trained)
    for name, value in frozen.items():
        assert torch.equal(value, base[name]), name


@pytest.mark.learning
def test_kl_penalty_keeps_the_policy_near_the_reference(tiny):
    gap = kl_gap(tiny)
    assert gap > THRESHOLDS["kl_penalty"], f"KL without the penalty minus with it: {gap:+.3f}"


def test_same_seed_same_run_and_resume_equals_uninterrupted(tiny, tmp_path):
    check_same_seed_and_resume(lambda **kwargs: make_ppo(tiny, **kwargs), tmp_path)
    assert (tmp_path / "whole" / "final" / "model.safetensors").exists()
    assert (tmp_path / "whole" / "metrics.jsonl").read_text().count("\n") == 4


def test_non_finite_loss_never_reaches_the_weights(tiny, tmp_path):
    algo = make_ppo(tiny, run_dir=tmp_path, checkpoint_every=1, max_nonfinite=2)
    algo.learn(1)
    before = [p.detach().clone() for p in algo.policy.parameters()]
    # a finite score whose square overflows float32: the value loss is inf (a NaN score is refused earlier)
    algo.envs.reward_fn = lambda prompts, completions: [3e38] * len(completions)
    with (
        pytest.warns(RuntimeWarning, match="non-finite"),
        pytest.raises(NonFiniteLossError, match="2 consecutive"),
    ):
        algo.learn(5)
    for a, b in zip(before, algo.policy.parameters()):
        assert torch.equal(a, b)
    checkpoints = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("iter_"))
    assert checkpoints[-1] == "iter_000003"  # the stopped iteration's, holding the last finite weights


def test_load_checkpoint_errors(tiny, tmp_path):
    algo = make_ppo(tiny, run_dir=tmp_path / "full", checkpoint_every=1)
    algo.learn(1)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        make_ppo(tiny).load_checkpoint(tmp_path / "nowhere")
    lora = make_ppo(tiny, lora_r=4)
    with pytest.raises(ValueError, match="does not fit this policy"):
        lora.load_checkpoint(tmp_path / "full")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"clip_range": 1.5}, "clip_range must be in"),
        ({"n_epochs": 0}, "n_epochs must be an integer >= 1"),
        ({"learning_rate": -1}, "learning_rate must be > 0"),
        ({"gamma": 2}, r"gamma must be in \[0, 1\]"),
        ({"lr_schedule": "cosine"}, "lr_schedule must be"),
        ({"batch_size": 0}, "batch_size must be"),
    ],
)
def test_bad_arguments(tiny, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_ppo(tiny, **kwargs)


def test_rollout_kl_metric_sums_every_step_of_each_rows_first_text(tiny):
    """With a zero score and beta = 1, a text's return is minus its KL: the logged KL must be the mean over
    rows of their first text's, each counted once, though the rows that stop early write several texts."""
    zero = lambda prompts, completions: [0.0] * len(completions)  # noqa: E731
    # a quarter of the vocabulary stops a text: texts end (and restart) early inside the rollout
    stop = list(range(0, 257, 4))
    algo = make_ppo(tiny, reward=zero, kl_coef=1.0, max_new_tokens=5, n_steps=12, stop_token_ids=stop)
    with torch.no_grad():  # a policy away from its reference (the copy made above), so that the KL is not 0
        algo.policy.model.lm_head.weight.mul_(2.0)
    stats = algo.collect_rollouts()["stats"]
    buffer = algo.buffer
    first_ends = [np.flatnonzero(buffer.dones[:, env])[0] for env in range(algo.n_envs)]
    kls = [-buffer.rewards[: end + 1, env].sum() for env, end in enumerate(first_ends)]
    assert stats["rollout/episodes"] > algo.n_envs  # several texts ended, some rows wrote more than one
    assert len(set(first_ends)) > 1  # and the first texts have different lengths
    assert min(kls) != max(kls)
    # measured: equal under 4 CPU kernel settings (docs/testing.md; the same float64 sums)
    assert stats["rollout/kl"] == pytest.approx(np.mean(kls), abs=1e-12)
    assert stats["rollout/ep_len"] == np.mean(first_ends) + 1


def test_only_the_latest_checkpoints_are_kept(tiny, tmp_path):
    algo = make_ppo(tiny, run_dir=tmp_path, checkpoint_every=1, keep_checkpoints=2, n_epochs=1)
    algo.learn(4)
    kept = sorted(p.name for p in (tmp_path / "checkpoints").glob("iter_*"))
    assert kept == ["iter_000003", "iter_000004"]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "iter_000004"


def test_clipped_value_loss_takes_the_larger_of_the_clipped_and_unclipped_errors():
    """Issue 14, OpenAI baselines' ppo2 and TRL: 0.5 * max((V - R)^2, (V_clip - R)^2). With V_old = 0, R = 1
    and V = -0.5 (clip 0.2) the unclipped error is the larger, so its gradient V - R = -1.5 flows; the loss of
    the clipped value alone (SB3's) would give 0, leaving a value moving away from the return unchecked."""
    values = torch.tensor([-0.5], requires_grad=True)
    loss = clipped_value_loss(values, torch.tensor([0.0]), torch.tensor([1.0]), clip_range_vf=0.2)
    (grad,) = torch.autograd.grad(loss, values)
    assert grad.item() == -1.5  # exact in float32
    assert loss.item() == 0.5 * 1.5**2
    # inside the clip range, and without clipping, the plain squared error
    values = torch.tensor([0.125], requires_grad=True)
    for clip in (0.2, None):
        (grad,) = torch.autograd.grad(
            clipped_value_loss(values, torch.tensor([0.0]), torch.tensor([1.0]), clip), values
        )
        assert grad.item() == 0.125 - 1.0  # exact in float32
