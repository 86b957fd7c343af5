"""Reward functions: batched scorers of finished texts.

A reward function is any callable ``(prompts, completions) -> scores`` over equal-length sequences of
strings, returning one float per pair (the :class:`RewardFunction` protocol). Scoring in batches lets a
neural reward model see all the episodes that end on the same step in one forward pass.
:func:`checked_scores` is how lm-gym calls one: it refuses a score that is not a finite real number.
"""

from __future__ import annotations

import json
import numbers
import reprlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal, NamedTuple, Protocol, runtime_checkable

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "REWARD_INPUT",
    "HFRewardModel",
    "LowercaseShare",
    "RewardFunction",
    "RewardInput",
    "VaderSentiment",
    "as_text_list",
    "checked_scores",
    "make_reward",
    "repeated_bigram_share",
]

# Written next to a trained reward model by algorithms.reward_model: its settings, its metrics and
# the input it was trained on (``include_prompt``; folders saved before REWARD_INPUT have only this).
REWARD_MODEL_INFO = "reward_model.json"
# The attribute of a reward model's config (so a key of its config.json) that holds the input format it was
# trained on, a RewardInput as a dict. A PretrainedConfig keeps attributes it does not know and writes them
# back, so the format travels with the weights (to the Hub too) and a transformers user can read it.
REWARD_INPUT = "lm_gym_reward_input"


class RewardInput(NamedTuple):
    """The text a reward model reads for a ``(prompt, completion)`` pair: the format it was trained on.

    Attributes:
        include_prompt: the prompt followed by the completion, rather than the completion alone.
        append_eos: the tokenizer's EOS token added at the end (unless the text already ends with it).
        chat_template: the pair as a user turn (the prompt) and an assistant turn (the completion) through the
            tokenizer's chat template, without a generation prompt; the rendered text is tokenized without
            adding special tokens (the template writes its own).
    """

    include_prompt: bool
    append_eos: bool
    chat_template: bool


@runtime_checkable
class RewardFunction(Protocol):
    """Scores finished texts: ``scores[i]`` rates ``completions[i]`` written after ``prompts[i]``."""

    def __call__(
        self, prompts: Sequence[str], completions: Sequence[str]
    ) -> Sequence[float] | np.ndarray: ...


def as_text_list(texts: Sequence[str], argument: str) -> list[str]:
    """``texts`` (prompts or completions) as a list; one string is refused, not read as one text per character.

    Args:
        texts: a sequence of strings.
        argument: its name in the error message.

    Raises:
        TypeError: if ``texts`` is a ``str`` (or ``bytes``): pass ``[text]`` for a single text.
    """
    if isinstance(texts, (str, bytes)):
        raise TypeError(
            f"{argument} must be a sequence of strings, not one {type(texts).__name__} (that would be one "
            f"text per character); got {reprlib.repr(texts)}: pass [{reprlib.repr(texts)}] for one text"
        )
    return list(texts)


def checked_scores(reward_fn: Callable, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
    """Call ``reward_fn(prompts, completions)`` and check that it returned one finite real number per text.

    The environments, the evaluation and the annotator panel score texts through this function, so a broken
    reward function stops the run at the step where it first misbehaves, not iterations later as a NaN loss.

    Returns:
        The scores, float64, shape ``(len(completions),)``.

    Raises:
        TypeError: the result is not a sequence, or a score is not a real number (None, a string, a
            complex number...); the message names the reward function, the value and its index.
        ValueError: there is not one score per text, or a score is NaN or infinite.
    """
    name = getattr(reward_fn, "__qualname__", None) or type(reward_fn).__qualname__
    n = len(completions)
    got = reward_fn(prompts, completions)
    if isinstance(got, torch.Tensor):
        got = got.detach().cpu()
        got = got.double() if got.is_floating_point() else got  # numpy has no bfloat16
    if hasattr(got, "__array__"):  # numpy, torch, pandas...
        got = np.asarray(got)
        if got.ndim != 1 or got.dtype.kind not in "biuf":  # the items are checked one by one below
            got = got.tolist()
    if isinstance(got, (str, bytes)) or not isinstance(got, Sequence | np.ndarray):
        raise TypeError(
            f"reward function {name!r} returned {reprlib.repr(got)} ({type(got).__name__}); it must return "
            f"a sequence of {n} scores, one finite real number per text"
        )
    if len(got) != n:
        raise ValueError(f"reward function {name!r} returned {len(got)} scores for {n} texts")
    if not isinstance(got, np.ndarray):
        for i, value in enumerate(got):
            if not (
                isinstance(value, numbers.Real | np.bool_)
                or (isinstance(value, torch.Tensor) and value.ndim == 0 and not value.is_complex())
            ):
                raise TypeError(
                    f"reward function {name!r} returned {reprlib.repr(value)} ({type(value).__name__}) as the "
                    f"score of text {i} of {n}; a score must be a finite real number"
                )
    scores = np.asarray(got, dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(scores))
    if bad.size:
        raise ValueError(
            f"reward function {name!r} returned {scores[bad[0]]} as the score of text {bad[0]} of {n} "
            f"({bad.size} non-finite in all); a score must be a finite real number"
        )
    return scores


def _paired(prompts: Sequence[str], completions: Sequence[str]) -> tuple[list[str], list[str]]:
    """``prompts`` and ``completions`` as lists of equal length.

    Raises:
        TypeError: if ``prompts`` or ``completions`` is one string (see :func:`as_text_list`).
        ValueError: if there are not as many prompts as completions (``zip`` would silently drop scores).
    """
    prompts, completions = as_text_list(prompts, "prompts"), as_text_list(completions, "completions")
    if len(prompts) != len(completions):
        raise ValueError(
            f"reward: got {len(prompts)} prompts but {len(completions)} completions; they must pair up"
        )
    return prompts, completions


def _texts(prompts: Sequence[str], completions: Sequence[str], include_prompt: bool) -> list[str]:
    """The texts to score: ``prompt + completion`` or the completion alone, one per pair (see :func:`_paired`
    for the errors)."""
    prompts, completions = _paired(prompts, completions)
    if include_prompt:
        return [p + c for p, c in zip(prompts, completions, strict=True)]
    return completions


class VaderSentiment:
    """VADER's compound sentiment of the completion, in [-1, 1] (Hutto & Gilbert 2014).

    Rule-based and fast (~0.1 ms a text), so it serves as the *gold* annotator of the sentiment task: the
    score a real labeller would give, against which learned reward models are judged.

    VADER sums the valence of the words it knows, so "great great great great" scores near 1: a policy can
    game it by repetition, which no reader would reward. With ``penalize_repetition`` the score is
    ``(1 - rho) * compound - rho``, where ``rho`` is the share of the text's word bigrams that repeat an
    earlier one (0 for ordinary prose; near 1 for a loop): a fluent text keeps its VADER score, and a
    degenerate one is pulled toward -1 (the ``sentiment-fluent`` task's gold scorer).

    Args:
        include_prompt: score ``prompt + completion`` instead of the completion alone.
        penalize_repetition: pull repetitive texts toward -1, as above.
    """

    def __init__(self, include_prompt: bool = False, penalize_repetition: bool = False) -> None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.include_prompt = include_prompt
        self.penalize_repetition = penalize_repetition
        self._analyzer = SentimentIntensityAnalyzer()

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
        texts = _texts(prompts, completions, self.include_prompt)
        scores = np.array([self._analyzer.polarity_scores(t)["compound"] for t in texts], dtype=np.float64)
        if self.penalize_repetition:
            rho = np.array([repeated_bigram_share(t) for t in texts], dtype=np.float64)
            scores = (1.0 - rho) * scores - rho
        return scores


def repeated_bigram_share(text: str) -> float:
    """The share of a text's word bigrams (lowercased, split on whitespace) that repeat an earlier one.

    0 for a text of fewer than 3 words or without a repeated bigram; ``(n - 2) / (n - 1)`` for one word said
    ``n`` times.
    """
    words = text.lower().split()
    bigrams = list(zip(words, words[1:]))
    return 1.0 - len(set(bigrams)) / len(bigrams) if bigrams else 0.0


class LowercaseShare:
    """The share of lowercase ASCII letters in the completion, in [0, 1]: a toy reward for tiny models.

    A random byte-level model scores about 0.1; a policy that learns to emit letters approaches 1 in a few
    hundred updates, which makes it the reward of the quick, CPU-minutes runs for teaching and smoke tests.
    """

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
        return np.array(
            [sum("a" <= ch <= "z" for ch in c) / max(1, len(c)) for c in _texts(prompts, completions, False)],
            dtype=np.float64,
        )


class HFRewardModel:
    """Any Hugging Face sequence-classification model as a reward function.

    The score is the head's scalar output when it has one label, else the logit (or probability) of
    ``label_index``: e.g. the "positive" class of a sentiment classifier.

    The model reads each pair in the format it was trained on (a :class:`RewardInput`, kept as
    ``input_format``; :meth:`texts` returns the strings it reads). The arguments ``include_prompt``,
    ``append_eos`` and ``chat_template`` set it field by field; each one left None comes from the first of:

    1. the model config's ``lm_gym_reward_input`` entry (:data:`REWARD_INPUT`), which lm-gym's reward models
       carry (:func:`algorithms.reward_model.save_reward_model`);
    2. the folder's ``reward_model.json`` (lm-gym reward models saved before that entry): its
       ``include_prompt``, no EOS, no chat template;
    3. for a model trained elsewhere, the way TRL's ``RewardTrainer`` trains one: the pair through the
       tokenizer's chat template when it has one, else ``prompt + completion + EOS``.

    Args:
        model: a model name/folder/Hub id (see :mod:`lm_gym.models`) or a loaded model.
        tokenizer: required when ``model`` is a loaded model.
        label_index: which output to use when the head has several labels.
        output: ``"logit"`` or ``"probability"`` (softmax over labels) for multi-label heads.
        include_prompt: score ``prompt + completion`` (True) or the completion alone (False); None: the
            model's own format, as above.
        append_eos: end every text with the tokenizer's EOS token, unless it already ends with it; None: the
            model's own format.
        chat_template: format each pair with the tokenizer's chat template (a user turn, then an assistant
            turn); None: the model's own format.
        batch_size: texts per forward pass.
        max_length: texts are truncated to this many tokens, at the tokenizer's truncation side (by default
            the end, EOS included; TRL drops the longer texts from training instead).
        device: default the model's device.
        dtype: weight dtype when loading by name (``"bf16"``, ``torch.float32``...; default float32); the
            scores are float32 whatever it is.
        trust_remote_code: passed to ``from_pretrained`` when loading by name.

    Raises:
        ValueError: a bad argument; ``append_eos`` on a tokenizer without an EOS token, or ``chat_template``
            on one without a chat template; a malformed ``lm_gym_reward_input`` in the model's config.
    """

    def __init__(
        self,
        model: str | PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase | None = None,
        *,
        label_index: int | None = None,
        output: Literal["logit", "probability"] = "logit",
        include_prompt: bool | None = None,
        append_eos: bool | None = None,
        chat_template: bool | None = None,
        batch_size: int = 32,
        max_length: int = 512,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        from lm_gym.models import load_sequence_classifier

        asked = RewardInput(include_prompt, append_eos, chat_template)
        for field, value in asked._asdict().items():
            if value is not None and not isinstance(value, bool):
                raise ValueError(
                    f"HFRewardModel: {field} must be True, False or None (the model's own format); got {value!r}"
                )
        if isinstance(model, str):
            model, loaded_tokenizer = load_sequence_classifier(
                model, device=device, dtype=dtype, trust_remote_code=trust_remote_code
            )
            tokenizer = tokenizer if tokenizer is not None else loaded_tokenizer
        elif tokenizer is None:
            raise ValueError("HFRewardModel: pass the tokenizer together with a loaded model")
        num_labels = model.config.num_labels
        if num_labels > 1 and label_index is None:
            raise ValueError(
                f"HFRewardModel: the head has {num_labels} labels {model.config.id2label}; "
                "pass label_index to say which one is the reward"
            )
        if label_index is not None and not 0 <= label_index < num_labels:
            raise ValueError(f"HFRewardModel: label_index must be in [0, {num_labels}); got {label_index}")
        if output not in ("logit", "probability"):
            raise ValueError(f"HFRewardModel: output must be 'logit' or 'probability'; got {output!r}")
        if batch_size < 1:
            raise ValueError(f"HFRewardModel: batch_size must be >= 1; got {batch_size}")
        trained = _trained_input(model, tokenizer)
        self.input_format = RewardInput(*(t if a is None else a for a, t in zip(asked, trained)))
        if self.input_format.append_eos and tokenizer.eos_token is None:
            raise ValueError("HFRewardModel: append_eos is on but the tokenizer has no eos_token")
        if self.input_format.chat_template and getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("HFRewardModel: chat_template is on but the tokenizer has no chat template")
        self.model = model.eval()
        if device is not None:
            self.model.to(device)
        self.tokenizer = tokenizer
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.label_index = label_index
        self.output = output
        self.batch_size = batch_size
        self.max_length = max_length

    @property
    def include_prompt(self) -> bool:
        """Whether the prompt is scored with the completion (see :class:`RewardInput`)."""
        return self.input_format.include_prompt

    @property
    def append_eos(self) -> bool:
        """Whether the text ends with the tokenizer's EOS token (see :class:`RewardInput`)."""
        return self.input_format.append_eos

    @property
    def chat_template(self) -> bool:
        """Whether the pair goes through the tokenizer's chat template (see :class:`RewardInput`)."""
        return self.input_format.chat_template

    def texts(self, prompts: Sequence[str], completions: Sequence[str]) -> list[str]:
        """The strings the model reads for these pairs, in its input format (before tokenization).

        Raises:
            TypeError: if ``prompts`` or ``completions`` is one string (see :func:`as_text_list`).
            ValueError: if there are not as many prompts as completions.
        """
        if self.chat_template:
            texts = [
                self.tokenizer.apply_chat_template(_turns(p, c, self.include_prompt), tokenize=False)
                for p, c in zip(*_paired(prompts, completions))
            ]
        else:
            texts = _texts(prompts, completions, self.include_prompt)
        if self.append_eos:
            eos = self.tokenizer.eos_token
            texts = [t if t.endswith(eos) else t + eos for t in texts]
        return texts

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
        texts = self.texts(prompts, completions)
        device = next(self.model.parameters()).device
        scores = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                texts[start : start + self.batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                add_special_tokens=not self.chat_template,  # as apply_chat_template(tokenize=True) does
                return_tensors="pt",
            ).to(device)
            logits = self.model(**batch).logits.float()  # (B, num_labels)
            if logits.shape[-1] == 1:
                scores.append(logits[:, 0])
            elif self.output == "probability":
                scores.append(logits.softmax(-1)[:, self.label_index])
            else:
                scores.append(logits[:, self.label_index])
        if not scores:
            return np.zeros(0)
        return torch.cat(scores).cpu().numpy().astype(np.float64)


def _turns(prompt: str, completion: str, include_prompt: bool) -> list[dict[str, str]]:
    """A pair as chat messages: the prompt as the user's turn (when included), the completion as the assistant's."""
    turns = [{"role": "user", "content": prompt}] if include_prompt else []
    return [*turns, {"role": "assistant", "content": completion}]


def _trained_input(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> RewardInput:
    """The input format ``model`` was trained on: its config's :data:`REWARD_INPUT`, else its folder's
    ``reward_model.json``, else that of TRL's ``RewardTrainer`` (see :class:`HFRewardModel`)."""
    saved = getattr(model.config, REWARD_INPUT, None)
    if saved is not None:
        if not (
            isinstance(saved, dict)
            and set(saved) == set(RewardInput._fields)
            and all(isinstance(v, bool) for v in saved.values())
        ):
            raise ValueError(
                f"reward model {model.name_or_path!r}: its config's {REWARD_INPUT} must map "
                f"{', '.join(RewardInput._fields)} each to true or false; got {saved!r}"
            )
        return RewardInput(**saved)
    folder = getattr(model, "name_or_path", "")
    info = Path(folder).expanduser() / REWARD_MODEL_INFO if folder else None
    if info is not None and info.is_file():  # an lm-gym reward model saved before REWARD_INPUT
        return RewardInput(bool(json.loads(info.read_text()).get("include_prompt", True)), False, False)
    # A model trained elsewhere: read as TRL's RewardTrainer trains one (TRL 1.16, trl/trainer/reward_trainer.py,
    # RewardTrainer._prepare_dataset, and trl/data_utils.py, _tokenize). A conversational pair (messages) goes
    # through apply_chat_template(prompt + completion, tokenize=True): no generation prompt, no EOS added (the
    # template closes the turn), no special tokens added to the rendered text. A plain-text pair is
    # prompt + completion + eos_token (EOS added only when the text does not already end with it), tokenized
    # with the tokenizer's special tokens (processing_class(text=...)). Which of the two a model saw is not
    # recorded, so the chat template is assumed when the tokenizer has one. (TRL's GRPOTrainer scores with a
    # reward model on prompt + completion alone, add_special_tokens=False: we follow how the model was trained.)
    templated = getattr(tokenizer, "chat_template", None) is not None
    return RewardInput(True, not templated and tokenizer.eos_token is not None, templated)


def make_reward(spec: str | RewardFunction | Callable, **kwargs) -> RewardFunction:
    """Turn a reward specification into a reward function.

    Args:
        spec: a callable ``(prompts, completions) -> scores`` (returned as is); ``"vader"`` for VADER
            sentiment; ``"vader-fluent"`` for VADER with its repetition penalty; ``"lowercase"`` for
            :class:`LowercaseShare`; or a reward-model name, folder or Hub id for :class:`HFRewardModel`.
        **kwargs: passed to :class:`HFRewardModel` (``label_index``, ``device``, ``dtype``, the input format
            ``include_prompt``/``append_eos``/``chat_template``...); ignored by the other kinds.
    """
    if callable(spec):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"reward must be a callable or a string; got {type(spec).__name__}")
    if spec == "vader":
        return VaderSentiment()
    if spec == "vader-fluent":
        return VaderSentiment(penalize_repetition=True)
    if spec == "lowercase":
        return LowercaseShare()
    return HFRewardModel(spec, **kwargs)
