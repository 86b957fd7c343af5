"""TextGenVectorEnv: equal to N single envs, autoreset modes, batched scoring."""

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.vector import AutoresetMode

import lm_gym  # noqa: F401
from lm_gym import TextGenVectorEnv
from lm_gym.models import tiny_seq2seq_lm
from lm_gym.vector_env import step_values


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
        "info_text": True,
    }


def scripted(rng, n, eos):
    """Random printable tokens, EOS one time in four: rows end at different steps."""
    actions = rng.integers(32, 127, size=n)
    actions[rng.random(n) < 0.25] = eos
    return actions


def test_make_vec_uses_the_native_vector_env(kwargs):
    envs = gym.make_vec("TextGen-v1", num_envs=3, **kwargs)
    assert isinstance(envs, TextGenVectorEnv)
    assert envs.action_space.shape == (3,) and envs.observation_space.shape == (3, 85)
    # same-step autoreset by default: TorchRL's GymWrapper refuses next-step, SB3 and CleanRL loops expect it
    assert envs.metadata["autoreset_mode"] == envs.autoreset_mode == AutoresetMode.SAME_STEP


def test_vector_env_equals_n_single_envs(kwargs, tiny):
    n, steps, eos = 3, 24, tiny[1].eos_token_id
    envs = gym.make_vec("TextGen-v1", num_envs=n, autoreset_mode=AutoresetMode.NEXT_STEP, **kwargs)
    singles = [gym.make("TextGen-v1", **kwargs) for _ in range(n)]
    v_obs, _ = envs.reset(seed=11)
    s_obs = [env.reset(seed=11 + i)[0] for i, env in enumerate(singles)]
    restart = [False] * n
    rng = np.random.default_rng(0)
    ends = 0
    for _ in range(steps):
        for i in range(n):
            np.testing.assert_array_equal(v_obs[i], s_obs[i])
        actions = scripted(rng, n, eos)
        v_obs, v_rew, v_term, v_trunc, v_info = envs.step(actions)
        for i, env in enumerate(singles):
            if restart[i]:  # next-step autoreset: this step only restarted the row
                s_obs[i], _ = env.reset()
                assert v_rew[i] == 0.0 and not v_term[i] and not v_trunc[i]
                restart[i] = False
                continue
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
    assert final[final >= 0].tolist()[-2:] == [33, 63]
    assert info["final_info"]["text"].tolist() == ["!?", "!?"]
    prompts = {tuple(envs.tokenizer(p)["input_ids"]) for p in envs.prompts}
    for i in range(2):  # already the next prompts, with no generated token
        assert tuple(obs[i][obs[i] >= 0]) in prompts
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
    assert info["_prompt_truncated"].all() and info["prompt"][0] == "Hey"


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
    with pytest.raises(ValueError, match="one seed per env"):
        envs.reset(seed=[1, 2, 3])


def test_info_text_decoder_equals_the_tokenizers_decode(tiny):
    """The info's text is decoded through a table of each token's bytes (byte-level tokenizers): equal to
    ``tokenizer.decode(ids, skip_special_tokens=True)`` on random ids, split multi-byte characters, special
    tokens and ids past the tokenizer's vocabulary included."""
    from lm_gym.vector_env import FastDecoder, _byte_level_table

    _, tokenizer = tiny
    vocab = len(tokenizer) + 3  # the model's vocabulary may be larger than the tokenizer's
    table = _byte_level_table(tokenizer._tokenizer, vocab)
    assert table is not None  # the table path is the one under test
    decode = FastDecoder(tokenizer, vocab)
    rng = np.random.default_rng(0)
    high = [i for i, token_bytes in enumerate(table) if token_bytes and token_bytes[0] >= 0x80]
    cases = [rng.integers(0, vocab, int(n)).tolist() for n in rng.integers(0, 30, 2000)]
    cases += [rng.choice(high, int(n)).tolist() for n in rng.integers(1, 8, 500)]  # split characters
    cases += [tokenizer("héllo wörld 🎉 日本")["input_ids"], tokenizer.all_special_ids, [vocab - 1]]
    for ids in cases:
        assert decode(ids) == tokenizer.decode(ids, skip_special_tokens=True), ids


def test_kl_of_a_policy_equal_to_the_reference_is_zero(kwargs, tiny):
    """Policy = a copy of the reference, sampled by a CachedSampler: the env prices the reference's log-prob as
    the sampler prices the policy's (log_softmax of equal logits), so log pi - log pi_ref is 0 (as logits[a] -
    logsumexp(logits) it came out up to 5e-7 per token here, 4e-4 nats per text on SmolLM2)."""
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
        obs, _, terminated, truncated, info = envs.step(actions)
        ref = step_values(info, "ref_log_prob", terminated | truncated)  # same-step autoreset: final_info
        kls += (log_probs.double().numpy() - ref).tolist()
    assert len(kls) == 48 and max(abs(k) for k in kls) <= 1e-7


@pytest.mark.parametrize("kind", ["causal", "seq2seq"])
@pytest.mark.parametrize("mode", ["SameStep", "NextStep"])
def test_the_observation_holds_each_rows_prompt_and_actions_across_restarts(tiny, kind, mode):
    """Each step's observation, advanced in place by the model's kind (lm_gym.kinds), holds what a rebuild from
    the tokens would: the prompt and the text (causal: one sequence; seq2seq: the source, and the start token
    and the text), whatever rows restarted."""
    model, tokenizer = tiny if kind == "causal" else tiny_seq2seq_lm(seed=0)
    prompts = ["The film opens on", "A slow", "Critics have been kind to", "Hello"]
    envs = TextGenVectorEnv(
        3, model=model, tokenizer=tokenizer, prompts=prompts, max_new_tokens=5, info_text=True,
        reward=lambda p, c: [0.0] * len(c), autoreset_mode=mode,
    )  # fmt: skip
    assert envs.kind.is_encoder_decoder == (kind == "seq2seq")
    start = getattr(model.config, "decoder_start_token_id", None)
    rng = np.random.default_rng(0)
    obs, info = envs.reset(seed=0)
    texts, fresh = [[] for _ in range(3)], np.zeros(3, dtype=bool)
    for _ in range(16):
        hf = envs.kind.hf_inputs(obs, tokenizer.pad_token_id)
        for i in range(3):
            prompt = tokenizer(info["prompt"][i])["input_ids"]
            masks = {key: hf[key.replace("input_ids", "attention_mask")][i] > 0 for key in hf}
            rows = {key: hf[key][i][masks[key]].tolist() for key in hf}
            if kind == "causal":
                assert rows["input_ids"] == prompt + texts[i]
            else:
                assert rows["input_ids"] == prompt and rows["decoder_input_ids"] == [start, *texts[i]]
        actions = scripted(rng, 3, tokenizer.eos_token_id)
        obs, _, terminated, truncated, info = envs.step(actions)
        done = terminated | truncated
        # SAME_STEP: a row that ended restarts in the step; NEXT_STEP: in the next one (its action ignored)
        restarted = fresh if mode == "NextStep" else done
        texts = [[] if restarted[i] else [*texts[i], int(actions[i])] for i in range(3)]
        fresh = done if mode == "NextStep" else fresh
    envs.close()
