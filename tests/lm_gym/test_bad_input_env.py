"""Issue 13 on the environment side: every mistake in what user code hands the env gets one line naming the
argument, the value received and what is allowed; nothing is silently changed (a reference decoder of another
model, a string split into one-character prompts, a score of NaN) or slowly retried (the Hub)."""

import copy
import re
from types import SimpleNamespace

import gymnasium as gym
import numpy as np
import pytest
import torch
from huggingface_hub import is_offline_mode
from huggingface_hub.errors import RepositoryNotFoundError
from transformers import GPT2Config, GPT2LMHeadModel

import lm_gym  # noqa: F401  (registers TextGen-v1)
import lm_gym.models as models
from lm_gym import TextGenEnv, TextGenVectorEnv
from lm_gym.decoding import BatchedDecoder
from lm_gym.models import tiny_causal_lm, tiny_seq2seq_lm, tiny_tokenizer
from lm_gym.preferences import data
from lm_gym.rewards import LowercaseShare, VaderSentiment
from lm_gym.tasks import Task, split_prompts


@pytest.fixture
def make_envs(tiny, toy_task):
    """Vector envs over the tiny model whose every episode ends after one token (all rows score together)."""
    model, tokenizer = tiny

    def make(num_envs=2, **kwargs):
        settings = dict(
            model=model, tokenizer=tokenizer, task=toy_task, max_new_tokens=1, max_prompt_tokens=16
        )
        return TextGenVectorEnv(num_envs, **{**settings, "kl_coef": 0.0, **kwargs})

    return make


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


# ---------------------------------------------------------------------------------------------------------
# 1. scores of a reward function
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "second_score, error, message",
    [
        (float("nan"), ValueError, r"returned nan as the score of text 1 of 2"),
        (float("inf"), ValueError, r"returned inf as the score of text 1 of 2"),
        (-float("inf"), ValueError, r"returned -inf as the score of text 1 of 2"),
        (None, TypeError, r"returned None \(NoneType\) as the score of text 1 of 2"),
        ("0.5", TypeError, r"returned '0.5' \(str\) as the score of text 1 of 2"),
        (1 + 2j, TypeError, r"returned \(1\+2j\) \(complex\) as the score of text 1 of 2"),
        ([0.5], TypeError, r"returned \[0.5\] \(list\) as the score of text 1 of 2"),
    ],
)
def test_a_bad_score_names_the_reward_function_the_value_and_its_index(
    make_envs, second_score, error, message
):
    def my_reward(prompts, completions):
        return [0.5, second_score]

    envs = make_envs(reward=my_reward)
    envs.reset(seed=0)
    with pytest.raises(error, match=message) as err:
        envs.step(np.array([72, 72]))
    assert "reward function 'test_a_bad_score" in one_line(err) and "my_reward" in one_line(err)


@pytest.mark.parametrize(
    "result, error, message",
    [
        (None, TypeError, r"returned None \(NoneType\); it must return a sequence of 2 scores"),
        (0.5, TypeError, r"returned 0.5 \(float\); it must return a sequence of 2 scores"),
        ("ab", TypeError, r"returned 'ab' \(str\); it must return a sequence of 2 scores"),
        ([0.5], ValueError, r"returned 1 scores for 2 texts"),
        (np.zeros(3), ValueError, r"returned 3 scores for 2 texts"),
        (np.full(2, 1 + 2j), TypeError, r"returned \(1\+2j\) \(complex\) as the score of text 0 of 2"),
        (np.zeros((2, 1)), TypeError, r"returned \[0.0\] \(list\) as the score of text 0 of 2"),
        (torch.tensor([0.0, float("nan")]), ValueError, r"returned nan as the score of text 1 of 2"),
    ],
)
def test_a_bad_result_of_a_reward_function_is_one_line(make_envs, result, error, message):
    envs = make_envs(reward=lambda prompts, completions: result)
    envs.reset(seed=0)
    with pytest.raises(error, match=message) as err:
        envs.step(np.array([72, 72]))
    assert one_line(err).startswith("reward function '")


@pytest.mark.parametrize(
    "result, expected",
    [
        ([0.5, -1], [0.5, -1.0]),
        ((True, 2.0), [1.0, 2.0]),
        (np.array([0.5, 1.0], dtype=np.float32), [0.5, 1.0]),
        ([np.float32(0.5), np.int64(1)], [0.5, 1.0]),
        (torch.tensor([0.5, 1.0], dtype=torch.bfloat16, requires_grad=True), [0.5, 1.0]),
        ([torch.tensor(0.5), torch.tensor(1.0)], [0.5, 1.0]),
    ],
)
def test_real_scores_of_any_usual_type_are_accepted(make_envs, result, expected):
    envs = make_envs(reward=lambda prompts, completions: result)
    envs.reset(seed=0)
    _, rewards, *_, infos = envs.step(np.array([72, 72]))
    assert rewards.tolist() == expected and infos["score"].dtype == np.float64


def test_the_single_env_and_a_reward_class_are_named(tiny, toy_task):
    class Sentiment:
        def __call__(self, prompts, completions):
            return [float("nan")] * len(completions)

    model, tokenizer = tiny
    env = gym.make(
        "TextGen-v1",
        model=model,
        tokenizer=tokenizer,
        task=toy_task,
        reward=Sentiment(),
        max_new_tokens=1,
        kl_coef=0.0,
    )
    env.reset(seed=0)
    with pytest.raises(
        ValueError, match=r"^reward function 'test_the_single.*Sentiment' returned nan .* 0 of 1"
    ):
        env.step(72)


# ---------------------------------------------------------------------------------------------------------
# 2. one string where a sequence of prompts (or texts) is expected
# ---------------------------------------------------------------------------------------------------------
ONE_STRING = r"must be a sequence of strings, not one str \(that would be one text per character\)"


def test_one_string_as_the_prompts_of_an_env_is_refused(tiny, toy_task):
    model, tokenizer = tiny
    for make in (TextGenEnv, lambda **kw: TextGenVectorEnv(2, **kw)):
        with pytest.raises(TypeError, match=rf"^prompts {ONE_STRING}; got 'The film opens on'") as err:
            make(model=model, tokenizer=tokenizer, task=toy_task, prompts="The film opens on")
        assert "pass ['The film opens on'] for one text" in one_line(err)


def test_one_string_as_the_prompts_of_a_reset_is_refused(make_envs):
    envs = make_envs()
    with pytest.raises(TypeError, match=rf"options\['prompts'\] {ONE_STRING}; got 'ab'"):
        envs.reset(seed=0, options={"prompts": "ab"})  # two characters for two rows: was accepted


@pytest.mark.parametrize(
    "call, argument",
    [
        (lambda: Task("t", "abc", ("x",), VaderSentiment), "task 't': train_prompts"),
        (lambda: Task("t", ("x",), "abc", VaderSentiment), "task 't': eval_prompts"),
        (lambda: split_prompts("abcdef", 0.5), "prompts"),
        (lambda: VaderSentiment()("ab", "cd"), "prompts"),
        (lambda: LowercaseShare()(["a", "b"], "cd"), "completions"),
    ],
)
def test_one_string_is_refused_wherever_texts_are_taken(call, argument):
    with pytest.raises(TypeError, match=f"^{argument} {ONE_STRING}"):
        call()


def test_one_string_as_the_prompts_of_an_evaluation_is_refused(tiny, toy_task):
    from lm_gym.evaluation import evaluate

    model, tokenizer = tiny
    with pytest.raises(TypeError, match=f"^prompts {ONE_STRING}"):
        evaluate(model, tokenizer, reference=model, task=toy_task, prompts="The film opens on")


# ---------------------------------------------------------------------------------------------------------
# 3. the kl_coef setter checks as the constructor does
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [-1, float("nan"), float("inf"), "0.1", None, True])
def test_kl_coef_setter_checks_like_the_constructor(make_envs, tiny, toy_task, value):
    message = "^kl_coef must be a finite number >= 0; got " + re.escape(repr(value)) + "$"
    with pytest.raises(ValueError, match=message):
        make_envs(kl_coef=value)
    envs = make_envs(kl_coef=0.1)
    env = TextGenEnv(model=tiny[0], tokenizer=tiny[1], task=toy_task)
    for target in (envs, env):
        with pytest.raises(ValueError, match=message):
            target.kl_coef = value
        # measured: equal under 4 CPU kernel settings (docs/testing.md)
        assert target.kl_coef == pytest.approx(0.1 if target is envs else 0.05)


def test_kl_coef_takes_any_real_number(make_envs):
    envs = make_envs(kl_coef=np.float32(0.25))
    assert envs.kl_coef == 0.25 and type(envs.kl_coef) is float
    envs.kl_coef = np.int64(2)
    assert envs.kl_coef == 2.0


# ---------------------------------------------------------------------------------------------------------
# 4. the reference decoder and the time limit
# ---------------------------------------------------------------------------------------------------------
def _other_model(model):
    """A model of the same architecture and weights, but another object than ``model``."""
    other = type(model)(model.config).eval()
    other.load_state_dict(model.state_dict())
    return other


def _shared_lora(model, num_rows, pad):
    """The shared-pass decoder of a LoRA copy of ``model`` (whose env must take the peft model as model=)."""
    from peft import LoraConfig, get_peft_model

    from algorithms.shared_pass import shared_lora_decoder

    lora = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=["q_proj"]))
    return shared_lora_decoder(lora, num_rows, pad, "default")


@pytest.mark.parametrize(
    "decoder, message",
    [
        (lambda model, pad: BatchedDecoder(_other_model(model), 2, pad), "steps another model"),
        (lambda model, pad: BatchedDecoder(model, 3, pad), "has 3 rows; the env has num_envs=2"),
        (lambda model, pad: BatchedDecoder(model, 1, pad), "has 1 rows; the env has num_envs=2"),
        (lambda model, pad: _shared_lora(model, 2, pad), r"steps another model \(PeftModel"),
        (lambda model, pad: "x", "must be a lm_gym.decoding.RowDecoder .*; got str"),
    ],
    ids=[
        "another model",
        "more rows",
        "fewer rows",
        "the LoRA model's decoder with the base model",
        "a string",
    ],
)
def test_a_reference_decoder_of_another_model_or_row_count_is_refused(make_envs, tiny, decoder, message):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="^reference_decoder " + message) as err:
        make_envs(reference_decoder=decoder(model, tokenizer.pad_token_id))
    one_line(err)


def test_a_reference_decoder_of_another_kind_or_in_the_background_is_refused(make_envs, tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="^async_reference=True with a reference_decoder") as err:
        make_envs(reference_decoder=BatchedDecoder(model, 2, tokenizer.pad_token_id), async_reference=True)
    one_line(err)
    t5, t5_tokenizer = tiny_seq2seq_lm(seed=0)
    with pytest.raises(
        ValueError, match="^model= is an encoder-decoder LM: reference_decoder must be a Seq2Seq"
    ):
        TextGenVectorEnv(
            2,
            model=t5,
            tokenizer=t5_tokenizer,
            reference_decoder=BatchedDecoder(t5, 2, t5_tokenizer.pad_token_id),
        )


def test_a_reference_decoder_of_the_model_in_as_many_rows_is_stepped(make_envs, tiny):
    model, tokenizer = tiny
    decoder = BatchedDecoder(model, 2, tokenizer.pad_token_id)
    envs = make_envs(reference_decoder=decoder)
    obs, _ = envs.reset(seed=0)
    assert [decoder.tokens[i] for i in range(2)] == [row[row >= 0].tolist() for row in obs]
    *_, infos = envs.step(np.array([72, 72]))  # one-token episodes: the step's info is in final_info
    final = infos["final_info"]
    assert final["_ref_log_prob"].all() and (final["ref_log_prob"] < 0).all()


@pytest.mark.parametrize("value", [0, -1, 2.0, "3", True])
def test_a_time_limit_that_is_no_positive_integer_is_refused(make_envs, value):
    with pytest.raises(
        ValueError, match="^max_episode_steps must be an integer >= 1; got " + re.escape(repr(value))
    ):
        make_envs(max_episode_steps=value)
    with pytest.raises(ValueError, match="^max_episode_steps must be an integer >= 1"):
        gym.make_vec("TextGen-v1", num_envs=2, model="tiny", max_episode_steps=value)


def test_a_time_limit_of_zero_on_the_single_env_is_refused(tiny, toy_task):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="^max_episode_steps must be an integer >= 1; got 0$"):
        TextGenEnv(model=model, tokenizer=tokenizer, task=toy_task, max_episode_steps=0)
    with pytest.raises(
        ValueError, match="max_episode_steps.* positive, actually: 0"
    ):  # Gymnasium's TimeLimit
        gym.make("TextGen-v1", model=model, tokenizer=tokenizer, task=toy_task, max_episode_steps=0)


# ---------------------------------------------------------------------------------------------------------
# 5. observations longer than the model's positions
# ---------------------------------------------------------------------------------------------------------
def _gpt2(n_positions):
    tokenizer = tiny_tokenizer()
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=n_positions, n_embd=16, n_layer=1, n_head=2)
    return GPT2LMHeadModel(config).eval(), tokenizer


def _t5_with_max_length(max_length):
    model, tokenizer = tiny_seq2seq_lm()
    tokenizer.model_max_length = max_length
    return model, tokenizer


@pytest.mark.parametrize(
    "model_and_tokenizer, lengths, message",
    [
        (
            tiny_causal_lm,  # max_position_embeddings=512
            dict(max_prompt_tokens=500, max_new_tokens=48),
            r"^max_prompt_tokens \+ max_new_tokens = 500 \+ 48 = 548 exceeds the model's 512 positions "
            r"\(config.max_position_embeddings\); lower max_prompt_tokens or max_new_tokens$",
        ),
        (
            lambda: _gpt2(64),  # GPT-2 names it n_positions
            dict(max_prompt_tokens=60, max_new_tokens=8),
            r"= 60 \+ 8 = 68 exceeds the model's 64 positions \(config.max_position_embeddings\)",
        ),
        (
            lambda: _t5_with_max_length(32),  # T5 has relative positions: the tokenizer's limit
            dict(max_prompt_tokens=33, max_new_tokens=8),
            r"^max_prompt_tokens = 33 exceeds the model's 32 positions \(tokenizer.model_max_length\)",
        ),
        (
            lambda: _t5_with_max_length(32),
            dict(max_prompt_tokens=8, max_new_tokens=32),
            r"^max_new_tokens \+ 1 = 33 exceeds the model's 32 positions \(tokenizer.model_max_length\)",
        ),
    ],
)
def test_observations_longer_than_the_model_are_refused(toy_task, model_and_tokenizer, lengths, message):
    model, tokenizer = model_and_tokenizer()
    with pytest.raises(ValueError, match=message):
        TextGenEnv(model=model, tokenizer=tokenizer, task=toy_task, **lengths)


@pytest.mark.parametrize(
    "model_and_tokenizer, lengths",
    [
        (tiny_causal_lm, dict(max_prompt_tokens=464, max_new_tokens=48)),  # exactly 512
        (lambda: _t5_with_max_length(32), dict(max_prompt_tokens=32, max_new_tokens=31)),
        (tiny_seq2seq_lm, dict(max_prompt_tokens=1000, max_new_tokens=1000)),  # no limit known
    ],
)
def test_observations_that_fit_are_accepted(toy_task, model_and_tokenizer, lengths):
    model, tokenizer = model_and_tokenizer()
    TextGenEnv(model=model, tokenizer=tokenizer, task=toy_task, **lengths).reset(seed=0)


# ---------------------------------------------------------------------------------------------------------
# 6. a mistyped local data path is a missing file, not a Hub data set
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "source, local",
    [
        ("./data/demos.jsonl", True),
        ("runs/prefs.jsonl", True),
        ("prefs.csv", True),
        ("data/prefs.parquet", True),
        ("prompts.txt", True),
        ("prefs.jsonl.gz", True),
        ("./data/prefs", True),
        ("../prefs", True),
        ("/tmp/no/such/prefs", True),
        ("~/prefs", True),
        ("runs/data/prefs", True),
        ("Anthropic/hh-rlhf", False),
        ("imdb", False),
        ("stanfordnlp/imdb", False),
    ],
)
def test_is_local_path(source, local):
    assert data.is_local_path(source) is local


@pytest.fixture
def no_hub_datasets(monkeypatch):
    """``datasets.load_dataset`` records its calls; a Hub name fails at once."""
    import datasets

    calls = []
    load = datasets.load_dataset

    def recording(path, *args, **kwargs):
        calls.append(path)
        if not kwargs.get("data_files"):
            raise AssertionError(f"asked the Hub for {path!r}")
        return load(path, *args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", recording)
    return calls


@pytest.mark.parametrize("source", ["./data/prefs", "runs/prefs.csv", "runs/data/prefs", "~/no/such/prefs"])
@pytest.mark.parametrize("load", ["load_preferences", "preference_dataset"])
def test_a_missing_preference_path_is_a_missing_file(no_hub_datasets, source, load):
    with pytest.raises(FileNotFoundError, match=f"preference data '{source}': no such file or folder") as err:
        getattr(data, load)(source)
    one_line(err)
    assert no_hub_datasets == []


def test_a_local_csv_file_is_read_from_disk(no_hub_datasets, tmp_path):
    path = tmp_path / "prefs.csv"
    path.write_text("prompt,chosen,rejected\nA film,great,dull\n")
    assert data.load_preferences(str(path)) == [data.PreferenceRecord("A film", "great", "dull")]
    assert no_hub_datasets == [str(tmp_path)]


# ---------------------------------------------------------------------------------------------------------
# 7. an unknown Hub model without the Hub: one line at once, no minute of retries
# ---------------------------------------------------------------------------------------------------------
NOT_HERE = (
    r"^model 'nobody/no-such-model-xyz': not a local folder, not a built-in name "
    r"\(tiny, tiny-t5, smollm2-135m, minilm-l6\), "
)
LOADERS = [
    models.load_causal_lm,
    models.load_seq2seq_lm,
    models.load_sequence_classifier,
    models.load_tokenizer,
    lambda name: TextGenVectorEnv(1, model=name),
    lambda name: TextGenVectorEnv(1, model="tiny", reward=name),  # a reward model's name
]


@pytest.fixture
def hub(monkeypatch):
    """No network: the probe of the Hub (``probes``) and the per-file requests that huggingface_hub retries
    for a minute (``files``) record their calls and fail at once."""
    import huggingface_hub.file_download

    calls = SimpleNamespace(probes=[], files=[])

    def probe(repo_id, **kwargs):
        calls.probes.append(repo_id)
        raise ConnectionError("[Errno -2] Name or service not known")

    def file_request(*args, **kwargs):
        calls.files.append(kwargs.get("url"))
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr(models, "model_info", probe)
    monkeypatch.setattr(huggingface_hub.file_download, "get_hf_file_metadata", file_request)
    return calls


@pytest.mark.parametrize("load", LOADERS)
def test_offline_an_unknown_hub_model_is_one_line_without_a_request(hub, load):
    reason = (
        r"not in the Hugging Face cache, and the Hub could not be reached \(offline: HF_HUB_OFFLINE is set\)$"
    )
    with pytest.raises(FileNotFoundError, match=NOT_HERE + reason) as err:
        load("nobody/no-such-model-xyz")
    one_line(err)
    assert hub.probes == [] and hub.files == []


@pytest.mark.parametrize("load", LOADERS)
def test_an_unreachable_hub_is_probed_and_no_file_is_requested(hub, monkeypatch, load):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setitem(is_offline_mode.__globals__, "HF_HUB_OFFLINE", False)
    reason = (
        r"not in the Hugging Face cache, and the Hub could not be reached "
        r"\(offline: ConnectionError: \[Errno -2\] Name or service not known\)$"
    )
    with pytest.raises(FileNotFoundError, match=NOT_HERE + reason) as err:
        load("nobody/no-such-model-xyz")
    one_line(err)
    assert set(hub.probes) == {"nobody/no-such-model-xyz"} and hub.files == []


def test_a_model_the_hub_does_not_know_is_one_line(monkeypatch):
    def not_found(repo_id, **kwargs):
        response = SimpleNamespace(headers={}, request=None)
        raise RepositoryNotFoundError("404 Repository Not Found", response=response)

    monkeypatch.setitem(is_offline_mode.__globals__, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(models, "model_info", not_found)
    reason = r"and the Hub has no model 'nobody/no-such-model-xyz' \(a private one needs `hf auth login`\)$"
    with pytest.raises(FileNotFoundError, match=NOT_HERE + reason):
        models.load_causal_lm("nobody/no-such-model-xyz")
