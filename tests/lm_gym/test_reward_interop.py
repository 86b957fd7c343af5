"""Reward models interoperate both ways: a reward model trained with TRL is scored on the input TRL trained
it on, and an lm-gym reward-model folder gives its environment score to a plain transformers user."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers.processors import TemplateProcessing
from transformers import (
    LlamaConfig,
    LlamaForSequenceClassification,
    pipeline,
)

from algorithms.reward_model import RewardModelResult, save_reward_model
from lm_gym.models import tiny_tokenizer
from lm_gym.rewards import REWARD_INPUT, REWARD_MODEL_INFO, HFRewardModel, RewardInput
from tests.toys import tiny_bert_classifier

PROMPTS = ["The film opens on", "A slow", "Critics have been kind to"]
COMPLETIONS = [" a wide shot of the sea.", " start, then a fine ending", " it"]
EOS = "<|endoftext|>"
# A small chat template in the usual shape: each turn tagged with its role and closed by EOS.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _trl_style_tokenizer(chat_template: str | None = None):
    """The tiny byte tokenizer as a TRL user's would be: a pad token other than EOS, and a BOS token that the
    tokenizer adds itself (``add_special_tokens=True``), as Llama's does."""
    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"pad_token": "<pad>", "bos_token": "<s>"})
    bos = tokenizer.convert_tokens_to_ids("<s>")
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bos)]
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def _save_trl_style(folder: Path, chat_template: str | None = None) -> Path:
    """A reward model as TRL's RewardTrainer leaves one: a 1-layer Llama sequence classifier with one output
    (it scores the last token that is not padding) and its tokenizer; no lm-gym input format anywhere."""
    tokenizer = _trl_style_tokenizer(chat_template)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        num_labels=1,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = LlamaForSequenceClassification(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def trl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_trl_style(tmp_path_factory.mktemp("trl_rm"))


@pytest.fixture(scope="module")
def trl_chat_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_trl_style(tmp_path_factory.mktemp("trl_chat_rm"), CHAT_TEMPLATE)


def _lm_gym_result(seed: int = 1) -> RewardModelResult:
    """An (untrained) lm-gym reward model: a 1-layer BERT with one output over the tiny byte tokenizer."""
    model, tokenizer = tiny_bert_classifier(seed, max_positions=256)
    return RewardModelResult(model.eval(), tokenizer, {}, [])


def _score_by_hand(model, ids: list[int]) -> float:
    """The model's score of one unpadded token sequence."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, 0].item()


# ---------------------------------------------------------------------------------------------------------
# lm-gym folders -> transformers users
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("include_prompt", [True, False])
def test_pipeline_on_an_lm_gym_folder_gives_the_env_score(tmp_path: Path, include_prompt: bool) -> None:
    folder = save_reward_model(_lm_gym_result(), tmp_path / "rm", include_prompt=include_prompt)
    config = json.loads((folder / "config.json").read_text())
    assert config[REWARD_INPUT] == {
        "include_prompt": include_prompt,
        "append_eos": False,
        "chat_template": False,
    }
    assert config["problem_type"] == "regression"  # the pipeline applies no sigmoid
    env_scores = HFRewardModel(str(folder), device="cpu")(PROMPTS, COMPLETIONS)
    texts = [p + c if include_prompt else c for p, c in zip(PROMPTS, COMPLETIONS)]
    scorer = pipeline("text-classification", model=str(folder), device="cpu")
    # measured: |diff| <= 2.8e-09 (relative 7.2e-07) under 4 CPU kernel settings (docs/testing.md)
    np.testing.assert_allclose([r["score"] for r in scorer(texts)], env_scores, rtol=1e-5, atol=1e-6)
    raw = scorer(texts, function_to_apply="none")
    # measured: |diff| <= 2.8e-09 (relative 7.2e-07) under 4 CPU kernel settings (docs/testing.md)
    np.testing.assert_allclose([r["score"] for r in raw], env_scores, rtol=1e-5, atol=1e-6)
    assert np.ptp(env_scores) > 0 and (np.asarray(env_scores) < 0).any()  # not a sigmoid in [0, 1]


def test_the_config_entry_wins_over_reward_model_json(tmp_path: Path) -> None:
    folder = save_reward_model(_lm_gym_result(), tmp_path / "rm", include_prompt=False)
    info = json.loads((folder / REWARD_MODEL_INFO).read_text())
    assert info["include_prompt"] is False  # still written, for older lm-gym versions
    (folder / REWARD_MODEL_INFO).write_text(json.dumps({**info, "include_prompt": True}))
    assert HFRewardModel(str(folder), device="cpu").input_format == RewardInput(False, False, False)


def test_an_old_folder_with_only_reward_model_json_is_still_honoured(tmp_path: Path) -> None:
    """Folders saved before the config entry: reward_model.json's include_prompt, no EOS (the tokenizer has
    one, so the TRL default would add it), no chat template."""
    result = _lm_gym_result()
    folder = tmp_path / "old"
    result.model.save_pretrained(folder)
    result.tokenizer.save_pretrained(folder)
    (folder / REWARD_MODEL_INFO).write_text(json.dumps({"include_prompt": False, "settings": {}}))
    assert REWARD_INPUT not in json.loads((folder / "config.json").read_text())
    rm = HFRewardModel(str(folder), device="cpu")
    assert rm.input_format == RewardInput(include_prompt=False, append_eos=False, chat_template=False)
    expected = [_score_by_hand(rm.model, rm.tokenizer.encode(c)) for c in COMPLETIONS]
    # measured: |diff| <= 1.9e-09 (relative 1.6e-07) under 4 CPU kernel settings (docs/testing.md)
    np.testing.assert_allclose(rm(PROMPTS, COMPLETIONS), expected, rtol=1e-5, atol=1e-6)


def test_a_trained_model_in_memory_carries_its_input_format(tmp_path: Path) -> None:
    """What train_reward_model returns is read as it was trained, before and after saving."""
    from algorithms.reward_model import train_reward_model
    from lm_gym.preferences.data import PreferenceRecord

    records = [PreferenceRecord(p, c + " good", c + " bad") for p, c in zip(PROMPTS, COMPLETIONS)]
    result = _lm_gym_result()
    trained = train_reward_model(
        records, model=result.model, tokenizer=result.tokenizer, epochs=1, eval_fraction=0.0, log=None
    )
    rm = HFRewardModel(trained.model, trained.tokenizer)
    assert rm.input_format == RewardInput(include_prompt=True, append_eos=False, chat_template=False)
    folder = save_reward_model(trained, tmp_path / "rm")  # include_prompt taken from the model's config
    assert json.loads((folder / REWARD_MODEL_INFO).read_text())["include_prompt"] is True


# ---------------------------------------------------------------------------------------------------------
# TRL reward models -> lm-gym
# ---------------------------------------------------------------------------------------------------------
def test_a_trl_model_is_scored_on_prompt_completion_eos(trl_dir: Path) -> None:
    rm = HFRewardModel(str(trl_dir), device="cpu")
    assert rm.input_format == RewardInput(include_prompt=True, append_eos=True, chat_template=False)
    assert rm.tokenizer.pad_token_id != rm.tokenizer.eos_token_id
    assert rm.texts(PROMPTS, COMPLETIONS) == [p + c + EOS for p, c in zip(PROMPTS, COMPLETIONS)]
    # the tokens TRL trains on: BOS (the tokenizer's own special tokens), the bytes, then the EOS token
    bos, eos = rm.tokenizer.bos_token_id, rm.tokenizer.eos_token_id
    fed = [[bos, *(p + c).encode(), eos] for p, c in zip(PROMPTS, COMPLETIONS)]
    expected = [_score_by_hand(rm.model, ids) for ids in fed]
    scores = rm(PROMPTS, COMPLETIONS)  # one padded batch
    # measured: |diff| <= 2.2e-08 (relative 2.8e-07) under 4 CPU kernel settings (docs/testing.md)
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)
    without_eos = [_score_by_hand(rm.model, ids[:-1]) for ids in fed]
    assert np.abs(scores - without_eos).min() > 1e-3  # the EOS really changes what the model scores
    no_eos = HFRewardModel(rm.model, rm.tokenizer, append_eos=False)
    # measured: |diff| <= 1.5e-08 (relative 1.6e-07) under 4 CPU kernel settings (docs/testing.md)
    np.testing.assert_allclose(no_eos(PROMPTS, COMPLETIONS), without_eos, rtol=1e-5, atol=1e-6)


def test_a_text_that_ends_with_eos_gets_no_second_one(trl_dir: Path) -> None:
    rm = HFRewardModel(str(trl_dir), device="cpu")
    assert rm.texts(["a"], ["b" + EOS]) == ["ab" + EOS]
    assert rm(["a"], ["b" + EOS])[0] == rm(["a"], ["b"])[0]  # the same tokens, the same forward


def test_a_trl_model_with_a_chat_template_is_scored_through_it(trl_chat_dir: Path) -> None:
    rm = HFRewardModel(str(trl_chat_dir), device="cpu")
    assert rm.input_format == RewardInput(include_prompt=True, append_eos=False, chat_template=True)
    texts = rm.texts(PROMPTS, COMPLETIONS)
    # a user turn and an assistant turn, each closed by the template's EOS; no generation prompt after
    assert texts == [f"<|user|>{p}{EOS}<|assistant|>{c}{EOS}" for p, c in zip(PROMPTS, COMPLETIONS)]
    # tokenized as apply_chat_template(tokenize=True) does: no BOS added to the rendered text
    eos = rm.tokenizer.eos_token_id
    fed = [
        [*f"<|user|>{p}".encode(), eos, *f"<|assistant|>{c}".encode(), eos]
        for p, c in zip(PROMPTS, COMPLETIONS)
    ]
    # measured: |diff| <= 2.2e-08 (relative 3.2e-07) under 4 CPU kernel settings (docs/testing.md)
    np.testing.assert_allclose(
        rm(PROMPTS, COMPLETIONS), [_score_by_hand(rm.model, ids) for ids in fed], rtol=1e-5, atol=1e-6
    )
    alone = HFRewardModel(rm.model, rm.tokenizer, include_prompt=False)
    assert alone.texts(PROMPTS, COMPLETIONS) == [f"<|assistant|>{c}{EOS}" for c in COMPLETIONS]
    plain = HFRewardModel(rm.model, rm.tokenizer, chat_template=False)  # an explicit choice wins
    assert plain.input_format == RewardInput(include_prompt=True, append_eos=False, chat_template=False)
    assert plain.texts(PROMPTS, COMPLETIONS) == [p + c for p, c in zip(PROMPTS, COMPLETIONS)]


def test_the_tokens_fed_are_those_trl_reward_trainer_trains_on(
    trl_dir: Path, trl_chat_dir: Path, tmp_path: Path
) -> None:
    """Against TRL itself (when installed): the chosen_ids of RewardTrainer's prepared dataset, for a
    plain-text and a conversational record, are the token ids HFRewardModel feeds for the same pair."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    for folder, conversational in ((trl_dir, False), (trl_chat_dir, True)):
        rm = HFRewardModel(str(folder), device="cpu")
        if conversational:
            rows = [
                {
                    "prompt": [{"role": "user", "content": p}],
                    "chosen": [{"role": "assistant", "content": c}],
                    "rejected": [{"role": "assistant", "content": "no"}],
                }
                for p, c in zip(PROMPTS, COMPLETIONS)
            ]
        else:
            rows = [{"prompt": p, "chosen": c, "rejected": "no"} for p, c in zip(PROMPTS, COMPLETIONS)]
        args = RewardConfig(output_dir=str(tmp_path / folder.name), report_to=[], use_cpu=True)
        trainer = RewardTrainer(
            model=rm.model, args=args, train_dataset=Dataset.from_list(rows), processing_class=rm.tokenizer
        )
        ours = rm.tokenizer(rm.texts(PROMPTS, COMPLETIONS), add_special_tokens=not rm.chat_template)
        assert list(trainer.train_dataset["chosen_ids"]) == ours["input_ids"]


# ---------------------------------------------------------------------------------------------------------
# Bad input formats
# ---------------------------------------------------------------------------------------------------------
def test_bad_input_format_arguments_are_refused(trl_dir: Path, tmp_path: Path) -> None:
    rm = HFRewardModel(str(trl_dir), device="cpu")
    with pytest.raises(ValueError, match="append_eos must be True, False or None"):
        HFRewardModel(rm.model, rm.tokenizer, append_eos="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no chat template"):
        HFRewardModel(rm.model, rm.tokenizer, chat_template=True)
    no_eos = _trl_style_tokenizer()
    no_eos.eos_token = None
    assert HFRewardModel(rm.model, no_eos).append_eos is False  # nothing to append
    with pytest.raises(ValueError, match="no eos_token"):
        HFRewardModel(rm.model, no_eos, append_eos=True)
    folder = save_reward_model(_lm_gym_result(), tmp_path / "rm")
    config = json.loads((folder / "config.json").read_text())
    config[REWARD_INPUT] = {"include_prompt": "yes", "append_eos": False, "chat_template": False}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=REWARD_INPUT):
        HFRewardModel(str(folder), device="cpu")
