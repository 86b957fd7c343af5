"""Tests of lm_gym.rewards: VADER, Hugging Face reward models, and make_reward."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import BertForSequenceClassification

from lm_gym.rewards import HFRewardModel, RewardFunction, VaderSentiment, make_reward, repeated_bigram_share
from lm_gym.tasks import get_task
from tests.toys import tiny_bert_classifier

TEXTS = [
    "A",
    "What a wonderful film, I loved every minute.",
    "Dull.",
    "The plot meanders for two hours before it arrives nowhere in particular, sadly.",
    "ok then",
]


def _save_tiny_bert(folder: Path, num_labels: int, seed: int) -> Path:
    """A 1-layer BERT classifier over the tiny byte tokenizer, saved with that tokenizer."""
    model, tokenizer = tiny_bert_classifier(seed, num_labels, max_positions=512)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def scalar_rm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of a tiny BERT reward model with one output."""
    return _save_tiny_bert(tmp_path_factory.mktemp("rm1"), num_labels=1, seed=1)


@pytest.fixture(scope="module")
def two_label_rm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of a tiny BERT classifier with two labels."""
    return _save_tiny_bert(tmp_path_factory.mktemp("rm2"), num_labels=2, seed=2)


def _logits_by_hand(model: BertForSequenceClassification, tokenizer, text: str) -> torch.Tensor:
    """The classifier's logits for one unpadded text read as TRL trains a reward model (these folders have no
    lm-gym input format): text + EOS, then CLS state -> tanh pooler -> linear head."""
    ids = torch.tensor([tokenizer.encode(text) + [tokenizer.eos_token_id]])
    with torch.no_grad():
        cls = model.bert.embeddings(input_ids=ids)
        cls = model.bert.encoder(cls).last_hidden_state[:, 0]
        pooled = torch.tanh(model.bert.pooler.dense(cls))
        return model.classifier(pooled)[0]


# ---------------------------------------------------------------------------------------------------------
# VaderSentiment
# ---------------------------------------------------------------------------------------------------------
def test_vader_scores_positive_and_negative_text() -> None:
    scores = VaderSentiment()(
        ["", ""],
        ["What a wonderful, brilliant film. I loved it!", "A terrible, awful, boring mess. I hated it."],
    )
    assert scores[0] > 0.5
    assert scores[1] < -0.5


def test_vader_returns_float_array_of_batch_length() -> None:
    scores = VaderSentiment()(["p"] * 4, ["good", "bad", "", "fine"])
    assert isinstance(scores, np.ndarray)
    assert scores.dtype == np.float64
    assert scores.shape == (4,)
    assert ((scores >= -1) & (scores <= 1)).all()


def test_vader_ignores_prompt_by_default_and_uses_it_when_asked() -> None:
    prompts, completions = ["This movie is horrible, awful and depressing. "], ["It has actors."]
    alone = VaderSentiment()(prompts, completions)[0]
    with_prompt = VaderSentiment(include_prompt=True)(prompts, completions)[0]
    assert alone == VaderSentiment()([""], completions)[0]
    assert with_prompt < alone - 0.5


def test_repetition_penalty_keeps_prose_and_sinks_loops() -> None:
    assert repeated_bigram_share("the plot is thin but the acting is superb") == 0.0
    # measured: equal under 4 CPU kernel settings (docs/testing.md)
    assert repeated_bigram_share("Great great GREAT great") == pytest.approx(2 / 3)  # (n - 2) / (n - 1)
    # measured: equal under 4 CPU kernel settings (docs/testing.md)
    assert repeated_bigram_share("a b a b a") == pytest.approx(0.5)  # (a b) (b a) (a b) (b a)
    assert repeated_bigram_share("fine") == 0.0
    texts = ["A warm, funny and moving film.", "great great great great great great great great"]
    plain = VaderSentiment()([""] * 2, texts)
    fluent = make_reward("vader-fluent")([""] * 2, texts)
    assert fluent[0] == plain[0] and plain[1] > 0.9  # VADER alone loves the loop
    rho = 6 / 7
    # measured: equal under 4 CPU kernel settings (docs/testing.md)
    assert fluent[1] == pytest.approx((1 - rho) * plain[1] - rho) and fluent[1] < -0.7
    # measured: equal under 4 CPU kernel settings (docs/testing.md)
    assert get_task("sentiment-fluent").make_reward()([""] * 2, texts) == pytest.approx(fluent)


def test_vader_rejects_unpaired_inputs() -> None:
    with pytest.raises(ValueError, match="prompts"):
        VaderSentiment(include_prompt=True)(["a", "b"], ["c"])
    with pytest.raises(ValueError, match="prompts"):
        VaderSentiment()(["a"], ["b", "c"])


def test_vader_is_a_reward_function() -> None:
    assert isinstance(VaderSentiment(), RewardFunction)


# ---------------------------------------------------------------------------------------------------------
# HFRewardModel
# ---------------------------------------------------------------------------------------------------------
def test_hf_reward_model_loads_folder_and_scores_with_scalar_head(scalar_rm_dir: Path) -> None:
    rm = HFRewardModel(str(scalar_rm_dir), device="cpu")
    assert isinstance(rm.model, BertForSequenceClassification)
    assert not rm.model.training
    scores = rm([""] * len(TEXTS), TEXTS)
    assert scores.dtype == np.float64 and scores.shape == (len(TEXTS),)
    expected = [_logits_by_hand(rm.model, rm.tokenizer, t)[0].item() for t in TEXTS]
    # measured: |diff| <= 3.7e-09 (relative 1.4e-06) under 4 CPU kernel settings (docs/testing.md)
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)
    assert np.ptp(scores) > 0  # the texts really get different scores


def test_hf_reward_model_joins_prompt_and_completion(scalar_rm_dir: Path) -> None:
    rm = HFRewardModel(str(scalar_rm_dir), device="cpu")
    joined = rm(["What a wonderful ", "Dul"], ["film", "l."])
    # measured: equal under 4 CPU kernel settings (docs/testing.md)
    np.testing.assert_allclose(joined, rm(["", ""], ["What a wonderful film", "Dull."]), rtol=1e-6)
    alone = HFRewardModel(str(scalar_rm_dir), include_prompt=False, device="cpu")
    # measured: equal under 4 CPU kernel settings (docs/testing.md)
    np.testing.assert_allclose(alone(["ignored ", "ignored "], ["film", "l."]), rm(["", ""], ["film", "l."]))


def test_hf_reward_model_needs_label_index_for_two_labels(two_label_rm_dir: Path) -> None:
    with pytest.raises(ValueError, match="label_index"):
        HFRewardModel(str(two_label_rm_dir), device="cpu")
    with pytest.raises(ValueError, match="label_index"):
        HFRewardModel(str(two_label_rm_dir), label_index=2, device="cpu")


def test_hf_reward_model_probability_is_hand_softmax(two_label_rm_dir: Path) -> None:
    rm = HFRewardModel(str(two_label_rm_dir), label_index=1, output="probability", device="cpu")
    scores = rm([""] * len(TEXTS), TEXTS)
    assert ((scores > 0) & (scores < 1)).all()
    expected = [_logits_by_hand(rm.model, rm.tokenizer, t).softmax(-1)[1].item() for t in TEXTS]
    # measured: equal under 4 CPU kernel settings (docs/testing.md)
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)


def test_hf_reward_model_logit_output_picks_label(two_label_rm_dir: Path) -> None:
    rm = HFRewardModel(str(two_label_rm_dir), label_index=0, device="cpu")
    expected = [_logits_by_hand(rm.model, rm.tokenizer, t)[0].item() for t in TEXTS]
    # measured: |diff| <= 3.7e-09 (relative 3.0e-07) under 4 CPU kernel settings (docs/testing.md)
    np.testing.assert_allclose(rm([""] * len(TEXTS), TEXTS), expected, rtol=1e-5, atol=1e-6)


def test_hf_reward_model_batch_size_does_not_change_scores(scalar_rm_dir: Path) -> None:
    big = HFRewardModel(str(scalar_rm_dir), batch_size=32, device="cpu")
    small = HFRewardModel(big.model, big.tokenizer, batch_size=2)
    one = HFRewardModel(big.model, big.tokenizer, batch_size=1)  # no padding at all
    prompts = [""] * len(TEXTS)
    # measured: |diff| <= 3.7e-09 (relative 1.4e-06) under 4 CPU kernel settings (docs/testing.md)
    np.testing.assert_allclose(small(prompts, TEXTS), big(prompts, TEXTS), rtol=1e-5, atol=1e-6)
    # measured: |diff| <= 3.7e-09 (relative 1.4e-06) under 4 CPU kernel settings (docs/testing.md)
    np.testing.assert_allclose(one(prompts, TEXTS), big(prompts, TEXTS), rtol=1e-5, atol=1e-6)


def test_hf_reward_model_empty_input_gives_empty_array(scalar_rm_dir: Path) -> None:
    scores = HFRewardModel(str(scalar_rm_dir), device="cpu")([], [])
    assert isinstance(scores, np.ndarray) and scores.shape == (0,)


def test_hf_reward_model_rejects_bad_arguments(scalar_rm_dir: Path, two_label_rm_dir: Path) -> None:
    rm = HFRewardModel(str(scalar_rm_dir), device="cpu")
    with pytest.raises(ValueError, match="tokenizer"):
        HFRewardModel(rm.model)
    with pytest.raises(ValueError, match="batch_size"):
        HFRewardModel(rm.model, rm.tokenizer, batch_size=0)
    with pytest.raises(ValueError, match="output"):
        HFRewardModel(str(two_label_rm_dir), label_index=1, output="odds", device="cpu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="prompts"):
        rm(["a", "b"], ["c"])


# ---------------------------------------------------------------------------------------------------------
# make_reward
# ---------------------------------------------------------------------------------------------------------
def test_make_reward_returns_callable_as_is() -> None:
    def constant(prompts, completions):
        return [1.0] * len(completions)

    assert make_reward(constant) is constant


def test_make_reward_vader() -> None:
    assert isinstance(make_reward("vader"), VaderSentiment)


def test_make_reward_folder_builds_hf_reward_model(two_label_rm_dir: Path) -> None:
    rm = make_reward(str(two_label_rm_dir), label_index=1, device="cpu")
    assert isinstance(rm, HFRewardModel)
    assert rm.label_index == 1


@pytest.mark.parametrize("spec", [3, None, ["vader"]])
def test_make_reward_rejects_non_callable_non_string(spec: object) -> None:
    with pytest.raises(TypeError, match="callable or a string"):
        make_reward(spec)  # type: ignore[arg-type]
