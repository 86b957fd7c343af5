"""TextGenVectorEnv: equal to N single envs, autoreset modes, batched scoring."""

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.vector import AutoresetMode

import lm_gym  # noqa: F401
from lm_gym import TextGenVectorEnv


@pytest.fixture
def kwargs(tiny, toy_task):
    model, tokenizer = tiny
    return {
        "model": model,
        "tokenizer": tokenizer,
        "task": toy_task,
        "max_new_tokens": 5,
        "max_prompt_tokens": 80,
        "kl_coef": 0.2,
    }


def scripted(rng, n, eos):
    """Random printable tokens, EOS one time in four: rows end at different steps."""
    actions = rng.integers(32, 127, size=n)
    actions[rng.random(n) < 0.25] = eos
    return actions, -rng.random(n) * 5


def test_make_vec_uses_the_native_vector_env(kwargs):
    envs = gym.make_vec("TextGen-v0", num_envs=3, **kwargs)
    assert isinstance(envs, TextGenVectorEnv)
    assert envs.action_space.shape == (3,) and envs.observation_space["input_ids"].shape == (3, 85)
    assert envs.metadata["autoreset_mode"] == AutoresetMode.NEXT_STEP


def test_vector_env_equals_n_single_envs(kwargs, tiny):
    n, steps, eos = 3, 24, tiny[1].eos_token_id
    envs = gym.make_vec("TextGen-v0", num_envs=n, **kwargs)
    singles = [gym.make("TextGen-v0", **kwargs) for _ in range(n)]
    v_obs, _ = envs.reset(seed=11)
    s_obs = [env.reset(seed=11 + i)[0] for i, env in enumerate(singles)]
    restart = [False] * n
    rng = np.random.default_rng(0)
    ends = 0
    for _ in range(steps):
        for i in range(n):
            np.testing.assert_array_equal(v_obs["input_ids"][i], s_obs[i]["input_ids"])
        actions, log_probs = scripted(rng, n, eos)
        envs.set_policy_log_probs(log_probs)
        v_obs, v_rew, v_term, v_trunc, v_info = envs.step(actions)
        for i, env in enumerate(singles):
            if restart[i]:  # next-step autoreset: this step only restarted the row
                s_obs[i], _ = env.reset()
                assert v_rew[i] == 0.0 and not v_term[i] and not v_trunc[i]
                restart[i] = False
                continue
            env.unwrapped.set_policy_log_prob(log_probs[i])
            s_obs[i], rew, term, trunc, info = env.step(actions[i])
            # measured: |diff| <= 1.9e-07 (relative 1.5e-06) under 4 CPU kernel settings (docs/testing.md)
            assert v_rew[i] == pytest.approx(rew, abs=1e-5)
            assert (v_term[i], v_trunc[i]) == (term, trunc)
            assert v_info["text"][i] == info["text"]
            # measured: |diff| <= 9.5e-07 (relative 1.9e-07) under 4 CPU kernel settings (docs/testing.md)
            assert v_info["ref_log_prob"][i] == pytest.approx(info["ref_log_prob"], abs=1e-5)
            if term or trunc:
                assert v_info["_score"][i] and v_info["score"][i] == info["score"]
                restart[i] = True
                ends += 1
    assert ends >= 2 * n  # several episodes each, ending at different steps


def test_rows_ending_together_are_scored_in_one_call(kwargs):
    calls = []

    def reward(prompts, completions):
        calls.append(len(completions))
        return np.ones(len(completions))

    envs = TextGenVectorEnv(4, **{**kwargs, "reward": reward, "stop_token_ids": []})
    envs.reset(seed=0)
    for _ in range(5):
        obs, rewards, term, trunc, info = envs.step(np.full(4, 65))
    assert calls == [4] and term.all() and not trunc.any()


def test_same_step_autoreset_puts_the_final_observation_in_info(kwargs):
    envs = TextGenVectorEnv(2, autoreset_mode="SameStep", **{**kwargs, "max_new_tokens": 2, "kl_coef": 0.0})
    obs, _ = envs.reset(seed=0, options={"prompts": ["Good", "Bad"]})
    envs.step(np.array([33, 33]))
    obs, rewards, term, trunc, info = envs.step(np.array([63, 63]))
    assert term.all() and not trunc.any() and info["_final_obs"].all()
    final = info["final_obs"][0]
    mask = final["attention_mask"] > 0
    assert final["input_ids"][mask].tolist()[-2:] == [33, 63]
    assert info["final_info"]["text"].tolist() == ["!?", "!?"]
    prompts = {tuple(envs.tokenizer(p)["input_ids"]) for p in envs.prompts}
    for i in range(2):  # already the next prompts, with no generated token
        assert tuple(obs["input_ids"][i][obs["attention_mask"][i] > 0]) in prompts
    assert info["text"].tolist() == ["", ""]


@pytest.mark.parametrize("mode", list(AutoresetMode))
def test_the_end_at_max_new_tokens_is_terminated_in_every_autoreset_mode(kwargs, mode):
    """Scored at max_new_tokens, the text is final: terminated, never truncated (a learner would bootstrap)."""
    texts = []

    def reward(prompts, completions):
        texts.extend(completions)
        return [1.0] * len(completions)

    settings = {**kwargs, "reward": reward, "max_new_tokens": 3, "stop_token_ids": [], "kl_coef": 0.0}
    envs = TextGenVectorEnv(2, autoreset_mode=mode, **settings)
    envs.reset(seed=0)
    steps = [envs.step(np.array([65, 66])) for _ in range(3)]
    flags = [(term.tolist(), trunc.tolist()) for _, _, term, trunc, _ in steps]
    assert flags == [([False, False], [False, False])] * 2 + [([True, True], [False, False])]
    assert texts == ["AAA", "BBB"] and steps[-1][1].tolist() == [1.0, 1.0]  # scored at the last step
    if mode == AutoresetMode.DISABLED:
        with pytest.raises(RuntimeError, match=r"episode ended: \[0, 1\]"):
            envs.step(np.array([65, 66]))
        return
    _, rewards, term, trunc, _ = envs.step(np.array([65, 66]))  # the next episodes go on
    assert not term.any() and not trunc.any() and rewards.tolist() == [0.0, 0.0]


def test_disabled_autoreset_requires_explicit_reset(kwargs):
    envs = TextGenVectorEnv(2, autoreset_mode=AutoresetMode.DISABLED, **{**kwargs, "max_new_tokens": 1})
    envs.reset(seed=0)
    envs.step(np.array([65, 66]))
    with pytest.raises(RuntimeError, match=r"episode ended: \[0, 1\]"):
        envs.step(np.array([65, 66]))
    obs, info = envs.reset(options={"reset_mask": np.array([True, False]), "prompts": ["Hey"]})
    assert info["_prompt"].tolist() == [True, False] and info["prompt"][0] == "Hey"


def test_vector_bad_input(kwargs):
    envs = TextGenVectorEnv(2, **kwargs)
    with pytest.raises(RuntimeError, match="call reset"):
        envs.step(np.array([1, 2]))
    envs.reset(seed=0)
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        envs.step(np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="integer token ids"):
        envs.step(np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"\[300\] at envs \[1\]"):
        envs.step(np.array([1, 300]))
    with pytest.raises(ValueError, match="expects 2 values"):
        envs.set_policy_log_probs([0.0])
    with pytest.raises(ValueError, match="one seed per env"):
        envs.reset(seed=[1, 2, 3])


def test_policy_model_runs_the_full_policy_in_the_env_pass(kwargs, tiny):
    """policy_model=: the env's twin pass gives the policy's own logits, and the same rewards as a separate
    policy forward (CachedSampler) reporting its log-probs."""
    import copy

    import torch

    from lm_gym.sampling import CachedSampler, SharedForwardSampler

    model, tokenizer = tiny
    policy = copy.deepcopy(model)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    kw = {**kwargs, "model": copy.deepcopy(model), "max_new_tokens": 6}
    shared = TextGenVectorEnv(3, policy_model=policy, autoreset_mode="SameStep", **kw)
    alone = TextGenVectorEnv(3, autoreset_mode="SameStep", **kw)
    own = CachedSampler(policy, 3, alone.pad_token_id)
    twin = SharedForwardSampler(shared)
    obs_a, _ = alone.reset(seed=5)
    obs_s, _ = shared.reset(seed=5)
    rng = np.random.default_rng(0)
    for _ in range(10):
        np.testing.assert_array_equal(obs_a["input_ids"], obs_s["input_ids"])
        own.act(obs_a)  # the policy's own forward (a prefill where the action was not its own)
        # measured: |diff| <= 1.4e-06 (relative 3.0e-03) under 4 CPU kernel settings (docs/testing.md)
        torch.testing.assert_close(shared.policy_logits, own.decoder.logits, atol=1e-4, rtol=1e-4)
        actions = torch.as_tensor(rng.integers(32, 127, size=3))
        logits = shared.policy_logits
        log_probs = torch.log_softmax(logits, -1).gather(1, actions[:, None])[:, 0]
        assert twin.act(obs_s)[0].shape == (3,)  # samples from the same logits
        alone.set_policy_log_probs(
            torch.log_softmax(own.decoder.logits, -1).gather(1, actions[:, None])[:, 0]
        )
        shared.set_policy_log_probs(log_probs)
        obs_a, rew_a, *_ = alone.step(actions)
        obs_s, rew_s, *_ = shared.step(actions)
        # measured: |diff| <= 2.9e-07 (relative 1.1e-04) under 4 CPU kernel settings (docs/testing.md)
        np.testing.assert_allclose(rew_s, rew_a, atol=1e-5)
    assert shared.policy_hidden.shape == (3, model.config.hidden_size)  # for a value head
    with pytest.raises(ValueError, match="policy_model is for a fully fine-tuned decoder-only policy"):
        TextGenVectorEnv(2, policy_model=policy, policy_adapter="default", **kw)


def test_info_text_decoder_equals_the_tokenizers_decode(tiny):
    """The info's text is decoded through a table of each token's bytes (byte-level tokenizers): equal to
    ``tokenizer.decode(ids, skip_special_tokens=True)`` on random ids, split multi-byte characters, special
    tokens and ids past the tokenizer's vocabulary included."""
    from lm_gym.vector_env import _byte_level_table, _fast_decoder

    _, tokenizer = tiny
    vocab = len(tokenizer) + 3  # the model's vocabulary may be larger than the tokenizer's
    table = _byte_level_table(tokenizer._tokenizer, vocab)
    assert table is not None  # the table path is the one under test
    decode = _fast_decoder(tokenizer, vocab)
    rng = np.random.default_rng(0)
    high = [i for i, token_bytes in enumerate(table) if token_bytes and token_bytes[0] >= 0x80]
    cases = [rng.integers(0, vocab, int(n)).tolist() for n in rng.integers(0, 30, 2000)]
    cases += [rng.choice(high, int(n)).tolist() for n in rng.integers(1, 8, 500)]  # split characters
    cases += [tokenizer("héllo wörld 🎉 日本")["input_ids"], tokenizer.all_special_ids, [vocab - 1]]
    for ids in cases:
        assert decode(ids) == tokenizer.decode(ids, skip_special_tokens=True), ids


def test_kl_of_a_policy_equal_to_the_reference_is_zero(kwargs, tiny):
    """Policy = a copy of the reference, sampled by a CachedSampler that reports its log-probs: the env prices
    the reference's log-prob as the sampler prices the policy's (log_softmax of equal logits), so the KL is 0
    (as logits[a] - logsumexp(logits) it came out up to 5e-7 per token here, 4e-4 nats per text on SmolLM2)."""
    import copy

    import torch

    from lm_gym.sampling import CachedSampler

    model, _ = tiny
    envs = TextGenVectorEnv(4, **{**kwargs, "model": copy.deepcopy(model), "max_new_tokens": 12})
    sampler = CachedSampler(
        copy.deepcopy(model), 4, envs.pad_token_id, generator=torch.Generator().manual_seed(0)
    )
    obs, _ = envs.reset(seed=0)
    kls = []
    for _ in range(12):
        actions, log_probs = sampler.act(obs)
        envs.set_policy_log_probs(log_probs)
        obs, _, _, _, info = envs.step(actions)
        if "kl" in info:
            kls += info["kl"][info["_kl"]].tolist()
    assert len(kls) >= 40 and max(abs(k) for k in kls) <= 1e-7
