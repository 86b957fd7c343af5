"""Encoder-decoder policies (tiny-t5): the env's seq2seq observation and KL, the cached decoder, the policy
(sampling = teacher forcing, LoRA, export) and the zoo (PPO learns; A2C, NLPO, TRPO and the CLI run)."""

import copy
import random

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env
from transformers import AutoModelForSeq2SeqLM

import lm_gym  # noqa: F401  (registers TextGen-v1)
from algorithms.a2c import A2C
from algorithms.cli import main
from algorithms.common.buffer import RolloutBuffer
from algorithms.nlpo import NLPO
from algorithms.policy import LMActorCriticPolicy
from algorithms.ppo import PPO
from algorithms.shared_pass import LoRASharedSeq2SeqDecoder, shared_lora_decoder
from algorithms.trpo import TRPO
from lm_gym.env import TextGenVectorEnv
from lm_gym.kinds import SEQ2SEQ
from lm_gym.models import is_seq2seq_lm, load_causal_lm, load_seq2seq_lm, tiny_seq2seq_lm
from lm_gym.seq2seq import Seq2SeqDecoder, observed_seq2seq
from lm_gym.spaces import PAD, hf_inputs
from lm_gym.vector_env import step_values
from tests.learning import INITIAL_MAX, THRESHOLDS, run_toy
from tests.toys import lowercase_share, toy_algo

PROMPTS = ["The film opens on", "A slow", "Critics have been kind to", "Hello"]
STOPS = list(range(64))  # a quarter of the bytes end an episode: rows restart at different times


@pytest.fixture(scope="module")
def t5():
    model, tokenizer = tiny_seq2seq_lm(seed=0)
    return model.requires_grad_(False), tokenizer


def zero_reward(prompts, completions):
    return [0.0] * len(completions)


@torch.no_grad()
def next_log_probs(model, source, prefix, temperature=1.0):
    """log-softmax of the next decoder token, from one uncached forward pass of the whole sequence."""
    out = model(input_ids=torch.tensor([source]), decoder_input_ids=torch.tensor([prefix]))
    return torch.log_softmax(out.logits[0, -1].float() / temperature, -1)


# ------------------------------------------------------------------------------------------------ models
def test_tiny_t5_loads_by_name_and_the_causal_loader_points_to_it():
    model, tokenizer = load_seq2seq_lm("tiny-t5", device="cpu")
    assert model.config.is_encoder_decoder and len(tokenizer) == 257
    assert model.config.decoder_start_token_id == tokenizer.pad_token_id  # as T5
    assert is_seq2seq_lm("tiny-t5") and not is_seq2seq_lm("tiny")
    with pytest.raises(ValueError, match="load_seq2seq_lm"):
        load_causal_lm("tiny-t5")


# ------------------------------------------------------------------------------------------------ env
def test_registered_env_passes_check_env_and_observes_source_and_decoder_prefix():
    env = gym.make(
        "TextGen-v1",
        model="tiny-t5",
        prompts=PROMPTS,
        reward=lowercase_share,
        max_new_tokens=4,
        info_text=True,
    )
    check_env(env.unwrapped, skip_render_check=True)
    space = env.observation_space  # row 0 the source, row 1 the decoder prefix; W = max(64, 4 + 1)
    assert isinstance(space, gym.spaces.Box) and space.shape == (2, 64) and space.dtype == np.int64
    assert space.low.min() == PAD and space.high.max() == 256
    start, pad = env.unwrapped.reference.config.decoder_start_token_id, env.unwrapped.tokenizer.pad_token_id

    obs, info = env.reset(seed=0, options={"prompt": "Hello"})
    assert obs.shape == (2, 64) and obs[0, :5].tolist() == list(b"Hello") and (obs[0, 5:] == PAD).all()
    assert obs[1, -1] == start and (obs[1, :-1] == PAD).all()  # the source left, the decoder prefix right
    assert info["ref_log_prob"] == 0.0 and info["score"] == 0.0 and info["text"] == ""
    obs, _, _, _, _ = env.step(ord("h"))
    obs, reward, terminated, truncated, info = env.step(ord("i"))
    assert obs[1, -3:].tolist() == [start, ord("h"), ord("i")] and (obs[1, :-3] == PAD).all()
    assert obs[0, :5].tolist() == list(b"Hello") and (obs[0, 5:] == PAD).all()  # the source does not move
    hf = hf_inputs(obs, pad, encoder_decoder=True)  # the HF layout: pad_token_id where the mask is 0
    assert hf["input_ids"][:6].tolist() == [*b"Hello", pad] and hf["attention_mask"].sum() == 5
    assert hf["decoder_input_ids"][-4:].tolist() == [pad, start, ord("h"), ord("i")]
    assert hf["decoder_attention_mask"].sum() == 3 and hf["decoder_attention_mask"][-3:].all()
    env.step(ord("!"))
    *_, terminated, truncated, info = env.step(ord("a"))  # the 4th token: max_new_tokens, scored, final
    assert terminated and not truncated
    assert info["prompt"] == "Hello" and info["text"] == "hi!a" and info["score"] == 0.75

    vec = gym.make_vec("TextGen-v1", num_envs=2, model="tiny-t5", prompts=PROMPTS, reward=zero_reward)
    assert vec.observation_space.shape == (2, 2, 64)  # W = max(max_prompt_tokens, max_new_tokens + 1)
    assert vec.reset(seed=0)[0].shape == (2, 2, 64)
    vec.close()


def test_reward_is_the_reference_half_of_the_kl_plus_the_score(t5):
    """r_t = kl_coef * log pi_ref(a_t|s_t) (+ the score at the end), log pi_ref from an uncached forward pass
    of the source and the decoder prefix; rows restart on new sources at different times."""
    reference, tokenizer = t5
    policy = tiny_seq2seq_lm(seed=1)[0]
    kl_coef, score = 0.3, 0.5
    envs = TextGenVectorEnv(
        3,
        model=reference,
        tokenizer=tokenizer,
        prompts=PROMPTS,
        reward=lambda prompts, completions: [score] * len(completions),
        kl_coef=kl_coef,
        max_new_tokens=5,
        stop_token_ids=STOPS,
        autoreset_mode="SameStep",
    )
    generator = torch.Generator().manual_seed(0)
    obs, _ = envs.reset(seed=0)
    restarts = 0
    for _ in range(12):
        sources, prefixes = observed_seq2seq(hf_inputs(obs, tokenizer.pad_token_id, encoder_decoder=True))
        policy_lp = [next_log_probs(policy, s, p) for s, p in zip(sources, prefixes)]
        actions = torch.stack([torch.multinomial(lp.exp(), 1, generator=generator)[0] for lp in policy_lp])
        ref_logp = torch.stack(
            [next_log_probs(reference, s, p)[a] for s, p, a in zip(sources, prefixes, actions)]
        ).double()
        obs, rewards, terminated, truncated, infos = envs.step(actions)
        # measured: |diff| <= 1.4e-06 (relative 5.9e-07) under 4 CPU kernel settings (docs/testing.md)
        np.testing.assert_allclose(
            step_values(infos, "ref_log_prob", terminated), ref_logp.numpy(), atol=1e-5
        )
        # measured: |diff| <= 4.3e-07 (relative 6.1e-07) under 4 CPU kernel settings (docs/testing.md)
        np.testing.assert_allclose(rewards, kl_coef * ref_logp.numpy() + score * terminated, atol=1e-5)
        assert not truncated.any()  # the end at max_new_tokens is terminated too
        restarts += int(terminated.sum())
    assert restarts >= 4  # rows restarted on new sources at different times (the cache's row surgery)
    envs.close()


def test_single_env_reward_is_kl_coef_times_its_ref_log_prob(t5):
    """The single seq2seq env: the same keys in every info, reward = kl_coef * info["ref_log_prob"] until the
    last step, where the score is added; the same actions with kl_coef=0 pay the score alone."""
    model, tokenizer = t5

    def run(kl_coef):
        env = gym.make(
            "TextGen-v1",
            model=model,
            tokenizer=tokenizer,
            prompts=PROMPTS,
            reward=lowercase_share,
            kl_coef=kl_coef,
            max_new_tokens=4,
        )
        obs, info = env.reset(seed=0)
        steps = [(None, None, False, info)]
        for token in b"ab!c":
            hf = hf_inputs(obs, tokenizer.pad_token_id, encoder_decoder=True)
            (source,), (prefix,) = observed_seq2seq(hf)
            ref_logp = float(next_log_probs(model, source, prefix)[token])
            obs, reward, terminated, _, info = env.step(token)
            steps.append((reward, ref_logp, terminated, info))
        env.close()
        return steps

    steps = run(0.2)
    for reward, ref_logp, terminated, info in steps:
        assert set(info) == {"ref_log_prob", "score", "prompt_truncated"}
        assert isinstance(info["ref_log_prob"], np.float64) and isinstance(info["prompt_truncated"], np.bool_)
        if reward is None:  # reset
            assert info["ref_log_prob"] == 0.0 and info["score"] == 0.0
            continue
        # measured: |diff| <= 4.8e-07 (relative 8.8e-08) under 4 CPU kernel settings (docs/testing.md)
        assert info["ref_log_prob"] == pytest.approx(ref_logp, abs=1e-5) and info["ref_log_prob"] < 0
        score = info["score"]
        assert isinstance(score, np.float64) and (terminated or score == 0.0)  # 0.0 until the text is final
        # measured: equal under 4 CPU kernel settings (docs/testing.md)
        assert reward == pytest.approx(0.2 * info["ref_log_prob"] + score, abs=1e-12)
    assert steps[-1][2] and steps[-1][3]["score"] == 0.75
    without_kl = run(0.0)
    assert [r for r, *_ in without_kl[1:]] == [0.0, 0.0, 0.0, 0.75]


@pytest.mark.parametrize("twin", [False, True])
def test_cached_decoder_equals_uncached_forward_after_any_resets_and_appends(t5, twin):
    model, tokenizer = t5
    if twin:  # the LoRA shared pass: reference rows (adapters off) and policy rows in one batch
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=4, target_modules="all-linear", task_type="SEQ_2_SEQ_LM")
        model = get_peft_model(copy.deepcopy(model), config)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.05)
    rng, n, pad = random.Random(0), 3, tokenizer.pad_token_id
    if twin:
        decoder = shared_lora_decoder(model, n, pad, "default")
        assert isinstance(decoder, LoRASharedSeq2SeqDecoder)
    else:
        decoder = Seq2SeqDecoder(model, n, pad, keep_hidden=True)
    source = lambda: [rng.randrange(256) for _ in range(rng.randint(1, 9))]  # noqa: E731
    decoder.reset_rows(range(n), [source() for _ in range(n)])
    for _ in range(14):
        if rng.random() < 0.3:  # some rows restart, with sources and decoder prefixes of other lengths
            rows = rng.sample(range(n), rng.randint(1, n - 1))
            prefixes = [[pad] + [rng.randrange(256) for _ in range(rng.randint(0, 3))] for _ in rows]
            decoder.reset_rows(rows, [source() for _ in rows], prefixes)
        else:  # rows left out get a gap in the cache
            decoder.append(torch.randint(0, 256, (n,)), torch.tensor([rng.random() < 0.7 for _ in range(n)]))
        for i in range(n):
            ids = {
                "input_ids": torch.tensor([decoder.sources[i]]),
                "decoder_input_ids": torch.tensor([decoder.tokens[i]]),
            }
            with torch.no_grad():
                if twin:
                    out = model(**ids, output_hidden_states=True)
                    with model.disable_adapter():
                        reference = model(**ids).logits[0, -1]
                    # measured: |diff| <= 4.1e-06 (relative 6.4e-03) under 4 CPU kernel settings (docs/testing.md)
                    torch.testing.assert_close(
                        decoder.twin_logits[i], out.logits[0, -1], atol=1e-4, rtol=1e-4
                    )
                else:
                    out = reference = model(**ids, output_hidden_states=True)
                    reference = reference.logits[0, -1]
            # measured: |diff| <= 1.9e-06 (relative 3.7e-03) under 4 CPU kernel settings (docs/testing.md)
            torch.testing.assert_close(decoder.logits[i], reference, atol=1e-4, rtol=1e-4)
            # measured: |diff| <= 2.7e-06 (relative 1.1e-03) under 4 CPU kernel settings (docs/testing.md)
            torch.testing.assert_close(
                decoder.hidden[i], out.decoder_hidden_states[-1][0, -1], atol=1e-4, rtol=1e-4
            )


# ------------------------------------------------------------------------------------------------ policy
def rollout(policy, steps=8, n=3, max_new_tokens=5, seed=0):
    """Run the policy's rollout agent in the env (with LoRA, on the env's shared pass, whose reference rows
    must be the model with its adapters off); return the filled buffer."""
    pad = policy.tokenizer.pad_token_id
    reference, shared = policy.env_reference(n)
    envs = TextGenVectorEnv(
        n,
        model=reference,
        tokenizer=policy.tokenizer,
        prompts=PROMPTS,
        reward=zero_reward,
        max_new_tokens=max_new_tokens,
        max_prompt_tokens=32,
        temperature=policy.temperature,
        stop_token_ids=STOPS,
        reference_decoder=shared,
        autoreset_mode="SameStep",
    )
    agent = policy.rollout_agent(n, torch.Generator().manual_seed(seed), shared)
    buffer = RolloutBuffer(steps, n, 32, kind=SEQ2SEQ)  # the observation's W = max(32, max_new_tokens + 1)
    obs, _ = envs.reset(seed=seed)
    for t in range(steps):
        obs = hf_inputs(obs, pad, encoder_decoder=True)
        actions, log_probs, values = agent.act(obs)
        next_obs, rewards, terminated, truncated, infos = envs.step(actions)
        if policy.adapter:  # the env's reference is the model with its adapters off
            with policy.model.disable_adapter():
                ref_logp = [
                    next_log_probs(policy.model, s, p, policy.temperature)[a]
                    for s, p, a in zip(*observed_seq2seq(obs), actions)
                ]
            # measured: |diff| <= 9.5e-07 (relative 5.7e-07) under 4 CPU kernel settings (docs/testing.md)
            np.testing.assert_allclose(
                step_values(infos, "ref_log_prob", terminated | truncated),
                torch.stack(ref_logp).double(),
                atol=1e-5,
            )
        buffer.add(t, obs, actions, log_probs, values, rewards, terminated | truncated)
        obs = next_obs
    envs.close()
    return buffer


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"temperature": 0.7, "top_k": 20, "top_p": 0.9},
        {"lora_r": 4, "top_p": 0.8},
        {"separate_critic": True},
    ],
)
def test_sampling_log_probs_and_values_equal_evaluate_actions(t5, kwargs):
    model, tokenizer = t5
    policy = LMActorCriticPolicy(copy.deepcopy(model), tokenizer, **kwargs)
    torch.nn.init.normal_(policy.value_head.weight, std=0.1)  # a non-trivial critic
    with torch.no_grad():
        for p in policy.model.parameters():
            if kwargs.get("lora_r") and p.requires_grad:
                p.add_(0.02)  # adapters that change the policy
    buffer = rollout(policy)
    assert buffer.dones.sum() > buffer.n_envs  # episodes ended, and restarted, inside the rollout
    buffer.advantages = buffer.returns = np.zeros_like(buffer.rewards)
    batch = next(buffer.minibatches(100, np.random.default_rng(0), policy.device, tokenizer.pad_token_id))
    with torch.no_grad():
        log_prob, entropy, values = policy.evaluate_actions(batch)
    assert log_prob.shape == (buffer.n_steps * buffer.n_envs,)
    # measured: |diff| <= 1.7e-06 (relative 1.1e-05) under 4 CPU kernel settings (docs/testing.md)
    torch.testing.assert_close(log_prob, batch.old_log_prob, atol=1e-4, rtol=1e-4)
    # measured: |diff| <= 6.6e-07 (relative 3.2e-06) under 4 CPU kernel settings (docs/testing.md)
    torch.testing.assert_close(values, batch.old_values, atol=1e-4, rtol=1e-4)
    assert (entropy >= 0).all()


def make_algo(t5, algo=PPO, lora_r=0, **kwargs):
    return toy_algo(algo, t5, **{"lora_r": lora_r, "batch_size": 8, **kwargs})


@pytest.mark.learning
def test_ppo_raises_the_toy_reward(t5):
    initial, rise, _ = run_toy("ppo_t5", t5)
    assert initial < INITIAL_MAX, f"the untrained model's first rollout scored {initial:.3f}"
    assert rise > THRESHOLDS["ppo_t5"], f"score rose by {rise:+.3f}, needed > {THRESHOLDS['ppo_t5']}"


def test_lora_trains_the_adapters_only_and_exports_a_plain_seq2seq_model(t5, tmp_path):
    algo = make_algo(t5, lora_r=8, learning_rate=1e-2, n_epochs=2)
    policy = algo.policy
    frozen = {k: v.clone() for k, v in policy.model.named_parameters() if not v.requires_grad}
    adapters = {k: v.clone() for k, v in policy.model.named_parameters() if v.requires_grad}
    algo.learn(3)
    for name, value in policy.model.named_parameters():
        if name in frozen:
            assert torch.equal(value, frozen[name])
    assert any(not torch.equal(v, adapters[k]) for k, v in policy.model.named_parameters() if k in adapters)

    policy.save_pretrained(tmp_path / "export")
    exported = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "export").eval()
    ids = {"input_ids": torch.tensor([list(b"Hello")]), "decoder_input_ids": torch.tensor([[256, 104, 105]])}
    with torch.no_grad():
        # measured: |diff| <= 1.2e-06 (relative 4.3e-05) under 4 CPU kernel settings (docs/testing.md)
        torch.testing.assert_close(exported(**ids).logits, policy.model(**ids).logits, atol=1e-4, rtol=1e-4)
    assert (tmp_path / "export" / "value_head.safetensors").exists()
    assert is_seq2seq_lm(str(tmp_path / "export"))  # and the env loads the folder as a seq2seq reference
    env = gym.make("TextGen-v1", model=str(tmp_path / "export"), prompts=PROMPTS, reward=zero_reward)
    assert env.reset(seed=0)[0].shape == (2, 64)  # the source and the decoder prefix
    algo.close()


@pytest.mark.parametrize("algo", [A2C, NLPO, TRPO])
def test_the_other_algorithms_train_on_seq2seq(t5, algo):
    algorithm = make_algo(t5, algo=algo, n_envs=4, max_new_tokens=4)
    before = [p.detach().clone() for p in algorithm.policy.model.parameters()]
    algorithm.learn(1)
    metrics = algorithm.logger.history[-1]
    assert np.isfinite(metrics["train/value_loss"]) and metrics["train/skipped_updates"] == 0
    if algo is not TRPO:  # TRPO may reject its one step in the line search
        assert any(not torch.equal(a, b) for a, b in zip(before, algorithm.policy.model.parameters()))
    algorithm.close()


def test_cli_trains_tiny_t5(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--model", "tiny-t5", "--run-dir", str(run), "--quiet", "--iterations", "1"]
    main([*args, "--n-envs", "2", "--max-new-tokens", "4", "--n-epochs", "1"])
    assert AutoModelForSeq2SeqLM.from_pretrained(run / "final").config.is_encoder_decoder
