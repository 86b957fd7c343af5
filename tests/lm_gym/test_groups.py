"""Group rollouts (``group_size``: G rows per prompt, ``info["group"]``) and the env without a per-token
reference (``per_token_reference=False``)."""

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from gymnasium.vector import AutoresetMode

import lm_gym  # noqa: F401  (registers TextGen-v1)
from lm_gym import TextGenVectorEnv
from lm_gym.decoding import BatchedDecoder
from lm_gym.vector_env import step_values

MANY_PROMPTS = [f"Prompt number {i}" for i in range(40)]


def text_length(prompts, completions):
    """A reward that is easy to check by hand: the completion's length in characters."""
    return [float(len(text)) for text in completions]


@pytest.fixture
def make_vec(tiny):
    model, tokenizer = tiny

    def make(num_envs, **kwargs):
        kwargs = {
            "model": model,
            "tokenizer": tokenizer,
            "prompts": MANY_PROMPTS,
            "reward": text_length,
            "max_new_tokens": 4,
            "max_prompt_tokens": 16,
            "info_text": True,
            **kwargs,
        }
        return gym.make_vec("TextGen-v1", num_envs=num_envs, **kwargs)

    return make


class ForwardCounter:
    """Counts the forward passes of a model (a forward pre-hook), removed on exit."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def __enter__(self):
        self.handle = self.model.register_forward_pre_hook(self.count)
        return self

    def count(self, module, args):
        self.calls += 1

    def __exit__(self, *exc):
        self.handle.remove()


def scripted_actions(steps, n, eos, seed=0):
    """(steps, n) random printable tokens, EOS one time in four: rows end at different steps."""
    rng = np.random.default_rng(seed)
    actions = rng.integers(32, 127, size=(steps, n))
    actions[rng.random((steps, n)) < 0.25] = eos
    return actions


def run(envs, actions, seed=3):
    """Reset with ``seed`` and step through ``actions``: the reset and step results."""
    out = [envs.reset(seed=seed)]
    out += [envs.step(a) for a in actions]
    return out


def test_the_rows_of_a_group_start_from_one_prompt(make_vec):
    envs = make_vec(12, group_size=3)
    _, info = envs.reset(seed=5)
    prompts = info["prompt"].reshape(4, 3)  # (groups, G)
    assert (prompts == prompts[:, :1]).all()
    assert len(set(prompts[:, 0])) == 4  # 40 prompts: the four groups drew four different ones
    # the draw of a group is that of its first row's generator (seeded 5 + row): the prompt row 3g gets alone
    _, alone = make_vec(12).reset(seed=5)
    assert prompts[:, 0].tolist() == alone["prompt"][::3].tolist()


def test_a_fixed_seed_gives_the_same_groups(make_vec):
    envs = make_vec(8, group_size=4)
    first = envs.reset(seed=7)[1]["prompt"].tolist()
    envs.step(np.full(8, 65))
    assert envs.reset(seed=7)[1]["prompt"].tolist() == first
    assert make_vec(8, group_size=4).reset(seed=7)[1]["prompt"].tolist() == first
    assert envs.reset(seed=8)[1]["prompt"].tolist() != first


def test_group_ids_follow_the_prompt_draws(make_vec, tiny):
    eos = tiny[1].eos_token_id
    envs = make_vec(6, group_size=3)
    _, info = envs.reset(seed=0)
    assert info["group"].dtype == np.int64 and info["_group"].all()
    assert info["group"].tolist() == [0, 0, 0, 1, 1, 1]
    # row 1 stops at once (same-step autoreset): it restarts on a prompt of its own, a new draw (id 2)
    _, _, terminated, _, info = envs.step(np.array([65, eos, 65, 65, 65, 65]))
    assert terminated.tolist() == [False, True, False, False, False, False]
    assert info["group"].tolist() == [0, 2, 0, 1, 1, 1] and info["_group"].all()
    final = info["final_info"]  # the ended text's info: its own group
    assert final["group"][1] == 0 and final["_group"].tolist() == [False, True, False, False, False, False]
    # a new reset forms new groups with new ids
    assert envs.reset()[1]["group"].tolist() == [3, 3, 3, 4, 4, 4]


def test_groups_with_disabled_autoreset_and_explicit_prompts(make_vec, tiny):
    eos = tiny[1].eos_token_id
    envs = make_vec(4, group_size=2, autoreset_mode=AutoresetMode.DISABLED)
    envs.reset(seed=0)
    envs.step(np.array([eos, eos, 65, 65]))
    # the two rows of block 0 reset together: one draw, one id
    _, info = envs.reset(options={"reset_mask": np.array([True, True, False, False])})
    assert info["prompt"][0] == info["prompt"][1] and info["group"].tolist() == [2, 2, 1, 1]
    # explicit prompts: each distinct prompt of a block is one draw
    _, info = envs.reset(options={"prompts": ["A", "A", "B", "C"]})
    assert info["prompt"].tolist() == ["A", "A", "B", "C"] and info["group"].tolist() == [3, 3, 4, 5]


def test_the_same_info_keys_at_every_step(make_vec):
    envs = make_vec(4, group_size=2, info_text=False)
    keys = [list(envs.reset(seed=0)[1])] + [list(envs.step(np.full(4, 65))[4]) for _ in range(3)]
    assert all(k == keys[0] for k in keys)  # no row ends in 3 tokens: no final_info
    assert keys[0] == [
        "ref_log_prob",
        "_ref_log_prob",
        "score",
        "_score",
        "prompt_truncated",
        "_prompt_truncated",
        "group",
        "_group",
    ]


def test_group_size_1_changes_nothing(make_vec, tiny):
    actions = scripted_actions(12, 4, tiny[1].eos_token_id)
    default, grouped = (
        run(make_vec(4, kl_coef=0.2), actions),
        run(make_vec(4, kl_coef=0.2, group_size=1), actions),
    )
    assert "group" not in default[0][1]
    for (obs, info), (obs1, info1) in zip(default[:1], grouped[:1]):
        np.testing.assert_array_equal(obs, obs1)
        assert info.keys() == info1.keys()
    for a, b in zip(default[1:], grouped[1:]):
        for x, y in zip(a[:4], b[:4]):  # obs, rewards, terminated, truncated: bit for bit
            np.testing.assert_array_equal(x, y)
        assert a[4].keys() == b[4].keys()
        np.testing.assert_array_equal(a[4]["ref_log_prob"], b[4]["ref_log_prob"])
        np.testing.assert_array_equal(a[4]["prompt"], b[4]["prompt"])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_envs": 6, "group_size": 4}, r"num_envs must be a multiple of group_size \(4\).*num_envs=6"),
        ({"num_envs": 4, "group_size": 0}, "group_size must be an integer >= 1; got 0"),
        ({"num_envs": 4, "group_size": 2.0}, "group_size must be an integer >= 1; got 2.0"),
        ({"num_envs": 2, "per_token_reference": False}, "kl_coef must be 0 with per_token_reference=False"),
        (
            {"num_envs": 2, "per_token_reference": False, "kl_coef": 0.0, "async_reference": True},
            "async_reference=True with per_token_reference=False",
        ),
    ],
)
def test_refusals(tiny, kwargs, message):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match=message):
        TextGenVectorEnv(model=model, tokenizer=tokenizer, prompts=MANY_PROMPTS, **kwargs)


def test_refusals_of_the_reference_off(tiny):
    model, tokenizer = tiny
    decoder = BatchedDecoder(model, 2, tokenizer.pad_token_id)
    with pytest.raises(ValueError, match="reference_decoder steps the reference per token"):
        TextGenVectorEnv(
            2,
            model=model,
            tokenizer=tokenizer,
            kl_coef=0.0,
            per_token_reference=False,
            reference_decoder=decoder,
        )
    envs = TextGenVectorEnv(2, model=model, tokenizer=tokenizer, kl_coef=0.0, per_token_reference=False)
    with pytest.raises(ValueError, match=r"kl_coef must be 0 with per_token_reference=False .*; got 0.1"):
        envs.kl_coef = 0.1  # an algorithm's KL controller, later
    # the single env is one row: a group of several rows is refused
    with pytest.raises(ValueError, match="num_envs must be a multiple of group_size"):
        gym.make("TextGen-v1", model=model, tokenizer=tokenizer, group_size=2)


@pytest.mark.parametrize("kwargs", [{}, {"per_token_reference": False, "kl_coef": 0.0}])
def test_single_env_passes_check_env(tiny, kwargs):
    model, tokenizer = tiny
    env = gym.make(
        "TextGen-v1", model=model, tokenizer=tokenizer, prompts=MANY_PROMPTS, max_new_tokens=4, **kwargs
    )
    check_env(env.unwrapped)


def test_without_the_reference_steps_run_no_forward_pass(make_vec, tiny):
    model, eos = tiny[0], tiny[1].eos_token_id
    actions = scripted_actions(12, 4, eos)
    with ForwardCounter(model) as on:
        with_reference = run(make_vec(4, kl_coef=0.0), actions)
    assert on.calls > 0  # the counter sees the reference's passes
    with ForwardCounter(model) as off:
        envs = make_vec(4, kl_coef=0.0, per_token_reference=False)
        without = run(envs, actions)
    assert off.calls == 0
    ends = 0
    for a, b in zip(with_reference[1:], without[1:]):
        obs, rewards, terminated, truncated, info = b
        dones = terminated | truncated
        ends += dones.sum()
        # the reward is the score alone: the completion's length at the end, 0 elsewhere
        scores = step_values(info, "score", dones)
        final_texts = [info["final_info"]["text"][i] if dones[i] else "" for i in range(4)]
        assert scores.tolist() == [float(len(t)) for t in final_texts]
        np.testing.assert_array_equal(rewards, scores)
        assert (info["ref_log_prob"] == 0.0).all() and not info["_ref_log_prob"].any()
        # the same episodes as the reference-on env at kl_coef 0
        for x, y in zip(a[:4], b[:4]):
            np.testing.assert_array_equal(x, y)
    assert ends >= 8  # several episodes ended, and were scored
    _, info = without[0]
    assert (info["ref_log_prob"] == 0.0).all() and not info["_ref_log_prob"].any()
