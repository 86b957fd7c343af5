"""The shared core of the critic-free group methods (algorithms/common/critic_free.py): group rollouts that
train on each row's first text, where the KL goes, dynamic sampling, mask_truncated, the refused settings,
seeding and resume, bf16 / LoRA / encoder-decoder runs, the logged metrics and the non-finite guard."""

import copy
import json

import numpy as np
import pytest
import torch
from gymnasium.vector import AutoresetMode

from algorithms.common.nonfinite import NonFiniteLossError
from algorithms.grpo import GRPO
from algorithms.reinforce_pp import REINFORCEPP
from algorithms.rloo import RLOO
from lm_gym.env import TextGenVectorEnv
from lm_gym.models import tiny_seq2seq_lm
from lm_gym.vector_env import step_values
from tests.toys import check_same_seed_and_resume, lowercase_share, make_rewards_nan, toy_algo

MANY_PROMPTS = [f"Prompt number {i}" for i in range(40)]
STOPS = list(range(0, 257, 4))  # a quarter of the vocabulary ends a text: texts end (and restart) early
# half of the prompts get one score whatever the text: their groups carry no policy gradient
FLAT = [f"Flat prompt {i}" for i in range(6)]
HALF_FLAT_PROMPTS = FLAT + [f"Varied prompt {i}" for i in range(6)]


def half_flat(prompts, completions):
    """0 for the FLAT prompts; a score that differs between (almost) any two texts for the others."""
    return [0.0 if p in FLAT else sum(map(ord, c)) / 1000 + 0.001 for p, c in zip(prompts, completions)]


def make(tiny, algo_cls=GRPO, **kwargs):
    return toy_algo(algo_cls, tiny, **{"group_size": 2, **kwargs})


def record_steps(algo) -> list[dict]:
    """From now on the infos of the algorithm's env steps are kept (one dict per step) in the returned list."""
    infos, step = [], algo.envs.step

    def recorded(actions):
        out = step(actions)
        infos.append(out[4])
        return out

    algo.envs.step = recorded
    return infos


def step_prompts(algo, step: int = 0) -> list[str]:
    """The prompt of each buffer column, decoded from its observation at ``step``."""
    obs, tokenizer = algo.buffer.observations, algo.policy.tokenizer
    return [
        tokenizer.decode(ids[mask.astype(bool)])
        for ids, mask in zip(obs["input_ids"][step], obs["attention_mask"][step])
    ]


def trainable(algo) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in algo.policy.trainable_state_dict().items()}


def moved(before: dict[str, torch.Tensor], algo) -> float:
    return max(float((v.float() - before[k].float()).abs().max()) for k, v in trainable(algo).items())


def perturb(algo) -> None:
    """Move the policy away from its reference (the reference copy is taken when the algorithm is built)."""
    with torch.no_grad():
        for name, p in algo.policy.model.named_parameters():
            if "lora_B" in name:  # LoRA: the adapters start at 0, the reference is the adapters off
                p.normal_(std=0.2)
        if algo.policy.adapter is None:
            algo.policy.model.lm_head.weight.mul_(2.0)


class EnvReferenceCounter:
    """Counts the forward passes of the env's model made inside the env's reset and step (its per-token
    reference), not the agent's passes between them (with the KL in the loss the env's model is the policy's)."""

    def __init__(self, algo):
        self.calls, self.inside = 0, False
        envs = algo.envs
        for name in ("reset", "step"):
            setattr(envs, name, self._inside(getattr(envs, name)))
        envs.reference.register_forward_pre_hook(self._count)

    def _inside(self, fn):
        def wrapped(*args, **kwargs):
            self.inside = True
            try:
                return fn(*args, **kwargs)
            finally:
                self.inside = False

        return wrapped

    def _count(self, module, args):
        self.calls += self.inside


# ---------------------------------------------------------------------------------------------- group rollouts
def test_group_rollouts_train_on_each_rows_first_text(tiny):
    algo = make(tiny, prompts=MANY_PROMPTS, stop_token_ids=STOPS, max_new_tokens=12)
    infos = record_steps(algo)
    algo.collect_rollouts()
    rollout, buffer, tokenizer = algo.rollout, algo.buffer, algo.policy.tokenizer
    prompts = step_prompts(algo)
    assert prompts[0::2] == prompts[1::2]  # the G = 2 rows of each group start from one prompt
    assert len(set(prompts[0::2])) == 4  # and the four groups drew four prompts
    assert rollout.columns.tolist() == list(range(8))
    # each row's first text ends at its first done; the rollout stopped when the last of them ended
    first_ends = [int(np.flatnonzero(buffer.dones[:, c])[0]) + 1 for c in range(8)]
    assert rollout.lengths.tolist() == first_ends and len(set(first_ends)) > 1
    assert len(infos) == max(first_ends) < algo.n_steps
    assert (buffer.dones[: len(infos)].sum(0) > 1).any()  # a row that ended early wrote a later text too
    for c, length in enumerate(rollout.lengths):
        final = infos[length - 1]["final_info"]
        actions = buffer.actions[:length, c]
        assert rollout.truncated[c] == (actions[-1] not in STOPS)
        text = actions if rollout.truncated[c] else actions[:-1]  # the env's text leaves the stop token out
        assert tokenizer.decode(text, skip_special_tokens=True) == final["text"][c]
        assert final["prompt"][c] == prompts[c]
        assert rollout.scores[c] == final["score"][c] == lowercase_share([prompts[c]], [final["text"][c]])[0]


# ---------------------------------------------------------------------------------------------- the KL
@pytest.mark.parametrize(
    "settings, env_reference",
    [
        ({"kl_coef": 0.1, "kl_placement": "loss"}, False),
        ({"kl_coef": 0.0, "kl_placement": "loss"}, False),
        ({"kl_coef": 0.0, "kl_placement": "reward", "kl_estimator": "k1"}, False),
        ({"kl_coef": 0.1, "kl_placement": "reward", "kl_estimator": "k1"}, True),
    ],
)
def test_the_env_runs_the_reference_only_with_the_kl_in_the_reward(tiny, settings, env_reference):
    algo = make(tiny, **settings)
    counter = EnvReferenceCounter(algo)
    infos = record_steps(algo)
    algo.collect_rollouts()
    assert algo.envs.per_token_reference == env_reference
    assert (counter.calls > 0) == env_reference
    assert any(info["_ref_log_prob"].any() for info in infos) == env_reference
    if settings["kl_coef"] == 0:  # no reference model anywhere: the env holds the policy's model, no copy
        assert algo.reference_model is None and algo.envs.reference is algo.policy.model
        assert "rollout/kl" not in algo.logger.values
    elif settings["kl_placement"] == "loss":
        assert algo.reference_model is not None and algo.envs.reference is algo.policy.model
    else:
        assert algo.reference_model is None and algo.envs.reference is not algo.policy.model


def env_reference_log_probs(algo, model, prompts: list[str], steps: int) -> np.ndarray:
    """(steps, N) log-probs of the buffer's actions under ``model``'s per-token reference, from an env that
    replays the rollout's round-0 texts."""
    n = algo.n_envs
    envs = TextGenVectorEnv(
        n,
        model=model,
        tokenizer=algo.policy.tokenizer,
        prompts=prompts,
        reward=half_flat,
        max_new_tokens=algo.n_steps,
        stop_token_ids=STOPS,
        kl_coef=0.0,
        autoreset_mode=AutoresetMode.SAME_STEP,
    )
    envs.reset(options={"prompts": prompts})
    out = np.zeros((steps, n))
    for t in range(steps):
        _, _, terminated, truncated, info = envs.step(algo.buffer.actions[t, :n])
        out[t] = step_values(info, "ref_log_prob", terminated | truncated)
    envs.close()
    return out


@pytest.mark.parametrize("lora_r", [0, 4])
def test_the_teacher_forced_reference_equals_the_per_token_reference(tiny, lora_r):
    """kl_placement='loss': the one teacher-forced pass after the rollout gives, token by token, what the env's
    per-token reference would have paid; with LoRA the reference is the model with its adapters off, the base."""
    algo = make(
        tiny,
        prompts=MANY_PROMPTS,
        reward=half_flat,
        stop_token_ids=STOPS,
        max_new_tokens=6,
        kl_coef=0.1,
        lora_r=lora_r,
    )
    perturb(algo)
    algo.collect_rollouts()
    rollout, buffer = algo.rollout, algo.buffer
    steps = int(rollout.lengths.max())
    model = tiny[0] if lora_r else algo.reference_model  # toy_algo's policy is a copy of tiny[0]
    expected = env_reference_log_probs(algo, model, step_prompts(algo), steps)
    mask = np.arange(steps)[:, None] < rollout.lengths[None, :]  # (T, N) the first texts' tokens
    got = np.where(mask, buffer.ref_log_probs[:steps], 0.0)
    # measured: |diff| <= 4.8e-07 (relative 1.1e-07) under 3 CPU kernel settings (docs/testing.md)
    np.testing.assert_allclose(got, np.where(mask, expected, 0.0), rtol=0, atol=1e-5)
    policy = np.where(mask, buffer.log_probs[:steps], 0.0)
    assert np.abs(policy - got).max() > 0.1  # the policy is not its reference: the check could fail


def test_the_kl_in_the_reward_is_beta_times_each_texts_summed_k1(tiny):
    beta = 0.3
    algo = make(
        tiny, kl_coef=beta, kl_placement="reward", kl_estimator="k1", stop_token_ids=STOPS, max_new_tokens=6
    )
    perturb(algo)
    infos = record_steps(algo)
    algo.collect_rollouts()
    rollout, buffer = algo.rollout, algo.buffer
    dones = buffer.dones.astype(bool)
    ref = np.stack([step_values(info, "ref_log_prob", dones[t]) for t, info in enumerate(infos)])  # (T, N)
    kls = np.array([(buffer.log_probs[:n, c] - ref[:n, c]).sum() for c, n in enumerate(rollout.lengths)])
    batch = algo.group_batch()
    expected = rollout.scores - beta * kls
    assert np.abs(kls).max() > 1  # the policy is not its reference: the penalty is not 0
    # measured: |diff| <= 1.1e-07 (relative 5.0e-08) under 3 CPU kernel settings (docs/testing.md), float32
    np.testing.assert_allclose(batch.rewards.numpy(), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(batch.scores.numpy(), rollout.scores.astype(np.float32))
    # measured: equal under 3 CPU kernel settings (docs/testing.md; the same float64 sums)
    assert algo.logger.values["rollout/kl"] == pytest.approx(kls.mean(), abs=1e-9)


# ---------------------------------------------------------------------------------------------- dynamic sampling
def test_dynamic_sampling_drops_exactly_the_groups_of_equal_scores(tiny):
    algo = make(
        tiny, prompts=HALF_FLAT_PROMPTS, reward=half_flat, dynamic_sampling=True, max_sampling_rounds=4
    )
    algo.collect_rollouts()
    rollout, stats, n = algo.rollout, algo.logger.values, algo.n_envs
    rounds = int(stats["rollout/sampling_rounds"])
    firsts = step_prompts(algo)[: rounds * n : 2]  # the prompt of every group of every round
    flat = [p in FLAT for p in firsts]
    assert rounds > 1 and any(flat[: n // 2])  # round 0 had flat groups, and more rounds refilled the batch
    assert stats["rollout/frac_zero_std_groups"] == sum(flat) / len(flat)
    assert stats["rollout/sampling_shortfall"] == 0
    # whole groups, in order, none of them flat, and their scores those of the reward
    assert (rollout.columns[1::2] == rollout.columns[0::2] + 1).all() and (
        rollout.columns[0::2] % 2 == 0
    ).all()
    assert (np.diff(rollout.columns) > 0).all() and rollout.columns.max() >= n
    assert not any(flat[c // 2] for c in rollout.columns)
    assert (rollout.scores[0::2] != rollout.scores[1::2]).all()
    before = trainable(algo)
    algo.train()
    assert moved(before, algo) > 0


def test_dynamic_sampling_tops_up_a_short_batch_with_dropped_groups(tiny):
    algo = make(
        tiny, prompts=HALF_FLAT_PROMPTS, reward=half_flat, dynamic_sampling=True, max_sampling_rounds=1
    )
    algo.collect_rollouts()
    rollout, stats = algo.rollout, algo.logger.values
    flat = [p in FLAT for p in step_prompts(algo)[0::2]]
    assert stats["rollout/sampling_rounds"] == 1 and 0 < sum(flat) < 4
    assert stats["rollout/sampling_shortfall"] == sum(flat)
    assert stats["rollout/frac_zero_std_groups"] == sum(flat) / 4
    # the groups with a gradient first, then the flat ones
    order = [g for g in range(4) if not flat[g]] + [g for g in range(4) if flat[g]]
    assert rollout.columns.tolist() == [2 * g + i for g in order for i in range(2)]


# ---------------------------------------------------------------------------------------------- mask_truncated
def test_with_mask_truncated_texts_cut_at_the_length_limit_give_no_gradient(tiny):
    for mask_truncated in (True, False):
        algo = make(tiny, stop_token_ids=[], mask_truncated=mask_truncated)  # no stop token: all are cut
        before = trainable(algo)
        algo.collect_rollouts()
        assert algo.rollout.truncated.all() and algo.logger.values["rollout/truncated_texts"] == 1.0
        algo.train()
        assert (moved(before, algo) == 0) == mask_truncated


def test_the_advantages_of_truncated_texts_do_not_reach_the_gradient(tiny, monkeypatch):
    gradients = {}
    for mask_truncated in (True, False):
        for shift in (0.0, 5.0):
            algo = make(tiny, stop_token_ids=STOPS, max_new_tokens=4, mask_truncated=mask_truncated)
            algo.collect_rollouts()
            truncated = algo.rollout.truncated
            assert 0 < truncated.sum() < len(truncated)  # some texts stopped, some hit the limit
            assert algo.logger.values["rollout/truncated_texts"] == truncated.mean()
            advantages = torch.linspace(-1.0, 1.0, 8) + shift * torch.as_tensor(truncated)
            monkeypatch.setattr(algo, "advantages", lambda batch, a=advantages: a)
            monkeypatch.setattr(algo, "step_optimizer", lambda finite=True: True)
            algo.train()
            gradients[mask_truncated, shift] = torch.cat(
                [p.grad.flatten() for p in algo.policy.parameters() if p.grad is not None]
            )
    assert torch.equal(gradients[True, 0.0], gradients[True, 5.0])
    assert not torch.allclose(gradients[False, 0.0], gradients[False, 5.0])


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "algo_cls, kwargs, message",
    [
        (GRPO, {"gae_lambda": 0.9}, "gae_lambda: not a setting of GRPO"),
        (RLOO, {"n_steps": 4}, "n_steps: not a setting of RLOO"),
        (GRPO, {"gamma": 0.9, "whiten_rewards": True}, "gamma, whiten_rewards: not a setting"),
        (GRPO, {"group_size": 3}, r"n_envs must be a multiple of group_size \(3\)"),
        (GRPO, {"group_size": 0}, "group_size must be an integer >= 1"),
        (GRPO, {"kl_placement": "reward"}, "kl_estimator='k3' with kl_placement='reward'"),
        (GRPO, {"group_size": 1, "dynamic_sampling": True}, "dynamic_sampling .* needs group_size >= 2"),
        (RLOO, {"group_size": 1}, "group_size must be >= 2 for RLOO"),
        (REINFORCEPP, {"baseline": True, "group_size": 1}, "baseline=True .* group_size must be >= 2"),
        (GRPO, {"separate_critic": True}, "separate_critic: GRPO has no critic"),
        (GRPO, {"kl_coef": 0.0, "reference": "a model"}, "reference: kl_coef=0 without kl_target"),
        (
            GRPO,
            {"lora_r": 4, "kl_coef": 0.05, "reference": "a model"},
            "reference: with LoRA the reference is",
        ),
        (GRPO, {"aggregation": "mean"}, "aggregation must be 'grpo', 'dr_grpo' or 'dapo'"),
        (GRPO, {"importance": "text"}, "importance must be 'token' or 'sequence'"),
        (GRPO, {"scale": "std"}, "scale must be 'group', 'batch' or 'none'"),
        (GRPO, {"kl_placement": "env"}, "kl_placement must be 'loss' or 'reward'"),
        (GRPO, {"kl_estimator": "k4"}, "kl_estimator must be 'k1', 'k2' or 'k3'"),
        (GRPO, {"eps_low": 1.0}, r"eps_low must be in \[0, 1\)"),
        (GRPO, {"micro_batch_size": 0}, "micro_batch_size must be an integer >= 1"),
        (GRPO, {"dynamic_sampling": True, "max_sampling_rounds": 0}, "max_sampling_rounds must be"),
    ],
)
def test_bad_settings_are_refused_in_one_line(tiny, algo_cls, kwargs, message):
    with pytest.raises(ValueError, match=message) as refused:
        make(tiny, algo_cls, **kwargs)
    assert "\n" not in str(refused.value)


# ---------------------------------------------------------------------------------------------- seeding, resume
def make_dapo_like(tiny, **kwargs):
    """Dynamic sampling with refills and the KL (k3) in the loss: every path of the core's rollout."""
    return make(
        tiny,
        n_envs=4,
        prompts=HALF_FLAT_PROMPTS,
        reward=half_flat,
        dynamic_sampling=True,
        kl_coef=0.05,
        n_epochs=2,
        batch_size=2,
        micro_batch_size=1,
        **kwargs,
    )


def test_same_seed_same_run_and_resume_equals_uninterrupted(tiny, tmp_path):
    check_same_seed_and_resume(lambda **kwargs: make_dapo_like(tiny, **kwargs), tmp_path)
    history = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 4 and max(h["rollout/sampling_rounds"] for h in history) > 1  # refills happened


# ---------------------------------------------------------------------------------------------- variants
def bf16(tiny):
    model, tokenizer = tiny
    return copy.deepcopy(model).to(torch.bfloat16), tokenizer


@pytest.mark.parametrize(
    "variant, algo_cls, kwargs",
    [
        ("bf16", GRPO, {"kl_coef": 0.05}),
        ("lora", GRPO, {"kl_coef": 0.05, "kl_placement": "reward", "kl_estimator": "k1", "lora_r": 4}),
        ("lora", RLOO, {"kl_coef": 0.05, "lora_r": 4}),
        ("t5", GRPO, {"kl_coef": 0.05}),
        ("t5", REINFORCEPP, {"kl_coef": 0.05}),
    ],
)
def test_runs_in_bf16_with_lora_and_on_an_encoder_decoder(tiny, variant, algo_cls, kwargs):
    model = {"bf16": bf16(tiny), "lora": tiny, "t5": tiny_seq2seq_lm(seed=0)}[variant]
    algo = make(model, algo_cls, **kwargs)
    before = trainable(algo)
    algo.learn(2)
    assert moved(before, algo) > 0
    if variant == "bf16":
        assert all(p.dtype == torch.bfloat16 for p in algo.policy.model.parameters())
    last = algo.logger.history[-1]
    for key in ("rollout/rm_score", "rollout/kl", "train/policy_loss", "train/entropy", "train/approx_kl"):
        assert np.isfinite(last[key]), key
    assert last["train/skipped_updates"] == 0


# ---------------------------------------------------------------------------------------------- metrics
@pytest.mark.parametrize("kl_coef", [0.05, 0.0])
def test_metrics_file_holds_the_group_methods_keys(tiny, tmp_path, kl_coef):
    algo = make(tiny, kl_coef=kl_coef, dynamic_sampling=True, run_dir=tmp_path)
    algo.learn(2)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["iteration"] for line in lines] == [1, 2]
    keys = (
        "train/clip_ratio_low",
        "train/clip_ratio_high",
        "train/policy_loss",
        "rollout/frac_zero_std_groups",
        "rollout/sampling_rounds",
        "rollout/sampling_shortfall",
        "rollout/truncated_texts",
    )
    for line in lines:
        for key in keys:
            assert key in line and np.isfinite(line[key]), key
        assert 0 <= line["rollout/frac_zero_std_groups"] <= 1 and 0 <= line["rollout/truncated_texts"] <= 1
        # the KL is measured and in the loss only with a reference
        assert ("rollout/kl" in line) == ("train/kl_loss" in line) == (kl_coef > 0)


# ---------------------------------------------------------------------------------------------- non-finite
def test_a_non_finite_reward_skips_the_update_and_stops_the_run(tiny):
    algo = make(tiny, kl_coef=0.05, max_nonfinite=2)
    algo.learn(1)
    before = trainable(algo)
    make_rewards_nan(algo)
    algo.collect_rollouts()
    algo._skipped_updates = 0
    algo.train()
    assert algo._skipped_updates == 1 and moved(before, algo) == 0
    with (
        pytest.warns(RuntimeWarning, match="non-finite"),
        pytest.raises(NonFiniteLossError, match="2 consecutive"),
    ):
        algo.learn(5)
    assert moved(before, algo) == 0 and algo.iteration == 3
