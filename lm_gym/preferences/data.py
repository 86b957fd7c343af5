"""Preference records: one comparison of two completions of a prompt, and their JSONL files.

The layout is the one of Anthropic's HH-RLHF set and of TRL's preference data sets (explicit-prompt
form): one JSON object per line with

* ``prompt`` (str, may be empty or absent): the shared context; HH-RLHF has no ``prompt`` and keeps the
  whole conversation in ``chosen``/``rejected``;
* ``chosen`` (str, non-empty): the completion that was preferred;
* ``rejected`` (str, non-empty): the other one.

A reward model scores ``prompt + chosen`` and ``prompt + rejected`` (the texts that
:class:`~lm_gym.rewards.HFRewardModel` scores in the environment). Optional fields, absent (or null) when
unknown:

* ``margin`` (float): how much ``chosen`` should beat ``rejected`` in the Bradley-Terry loss;
* ``chosen_score`` / ``rejected_score`` (float): normalized scalar rewards of the two completions derived
  from Elo ratings (:mod:`lm_gym.preferences.elo`): z-scored over every completion of the collection;
* ``agreement`` (float in [0.5, 1]): share of the annotators who preferred ``chosen``.

Other fields are ignored, so records of richer data sets load as they are.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

__all__ = [
    "DATA_SUFFIXES",
    "PreferenceRecord",
    "is_local_path",
    "load_preferences",
    "parse_record",
    "preference_dataset",
    "ranking_to_pairs",
    "read_jsonl",
    "write_jsonl",
]

# suffixes of the data files that ``datasets`` reads (a compressed file keeps its inner suffix: x.jsonl.gz)
DATA_SUFFIXES = (".json", ".jsonl", ".ndjson", ".csv", ".tsv", ".parquet", ".arrow", ".txt")
_TEXT_FIELDS = ("chosen", "rejected")
_NUMBER_FIELDS = ("margin", "chosen_score", "rejected_score", "agreement")


class PreferenceRecord(NamedTuple):
    """One comparison: ``chosen`` was preferred to ``rejected`` as a continuation of ``prompt``."""

    prompt: str
    chosen: str
    rejected: str
    margin: float | None = None
    chosen_score: float | None = None
    rejected_score: float | None = None
    agreement: float | None = None

    def to_json(self) -> dict[str, Any]:
        """The JSON object of the record; unknown (None) optional fields are left out."""
        return {k: v for k, v in self._asdict().items() if v is not None}


def ranking_to_pairs(ranks: Sequence[float]) -> list[tuple[int, int]]:
    """Every ordered pair of a ranking: K ranked outputs give K(K-1)/2 comparisons (InstructGPT, Sec. 3.5).

    Args:
        ranks: ``ranks[i]`` is the rank of output ``i``, lower is better (1 = best); equal ranks are a tie
            and give no pair.

    Returns:
        ``(winner, loser)`` index pairs, in the order of ``i < j``.
    """
    return [
        (i, j) if ranks[i] < ranks[j] else (j, i)
        for i in range(len(ranks))
        for j in range(i + 1, len(ranks))
        if ranks[i] != ranks[j]
    ]


def parse_record(obj: Any, where: str) -> PreferenceRecord:
    """Check one JSON object and turn it into a :class:`PreferenceRecord`.

    Args:
        obj: the decoded JSON value.
        where: names the record in error messages, e.g. ``"prefs.jsonl line 3"``.

    Raises:
        ValueError: naming ``where`` and the field: a missing text, a text that is not a string or is
            empty, an optional number that is not a number.
    """
    if not isinstance(obj, Mapping):
        raise ValueError(f"{where}: expected a JSON object with 'chosen' and 'rejected'; got {_kind(obj)}")
    prompt = obj.get("prompt", "")
    if prompt is None:
        prompt = ""
    if not isinstance(prompt, str):
        raise ValueError(f"{where}: field 'prompt' must be a string; got {_kind(prompt)}")
    texts = []
    for name in _TEXT_FIELDS:
        if name not in obj:
            raise ValueError(
                f"{where}: field {name!r} is missing (a record needs 'chosen' and 'rejected', optionally 'prompt')"
            )
        value = obj[name]
        if not isinstance(value, str):
            raise ValueError(
                f"{where}: field {name!r} must be a string; got {_kind(value)} "
                "(conversational lists of messages are not supported: join them into one text)"
            )
        if not value.strip():
            raise ValueError(f"{where}: field {name!r} is an empty text")
        texts.append(value)
    numbers: dict[str, float | None] = {}
    for name in _NUMBER_FIELDS:
        value = obj.get(name)
        if value is None:
            numbers[name] = None
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"{where}: field {name!r} must be a finite number or null; got {value!r}")
        numbers[name] = float(value)
    agreement = numbers["agreement"]
    if agreement is not None and not 0.0 <= agreement <= 1.0:
        raise ValueError(f"{where}: field 'agreement' must be in [0, 1]; got {agreement}")
    return PreferenceRecord(prompt, texts[0], texts[1], **numbers)


def is_local_path(source: str | os.PathLike[str]) -> bool:
    """Whether a data source (demonstrations, preferences, prompts) names a local file or folder rather than
    a Hub data set, so that a mistyped path is reported as a missing file instead of being asked of the Hub.

    A path is: a ``Path``; an existing file or folder; a name with a data-file suffix (:data:`DATA_SUFFIXES`:
    ``runs/prefs.jsonl``); anything that cannot be a Hub id (``huggingface_hub``'s ``validate_repo_id``:
    ``./data``, ``../x``, ``/x``, ``~/x``, ``runs/data/prefs``). ``name`` and ``owner/name`` are Hub ids.

    Args:
        source: the string or path given.
    """
    if not isinstance(source, str) or Path(source).expanduser().exists():
        return True
    if any(suffix.lower() in DATA_SUFFIXES for suffix in Path(source).suffixes):
        return True
    try:
        validate_repo_id(source)
    except HFValidationError:
        return True
    return False


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _read_lines(path: Path) -> Iterator[PreferenceRecord]:
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path} line {number}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
            yield parse_record(obj, where)


def read_jsonl(path: str | Path) -> list[PreferenceRecord]:
    """Read and check a JSONL file of preference records (blank lines are skipped).

    Raises:
        FileNotFoundError: if there is no such file.
        ValueError: for a malformed record, naming the file, the line and the field.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"preference file {path}: no such file")
    return list(_read_lines(path))


def write_jsonl(records: Iterable[PreferenceRecord], path: str | Path) -> Path:
    """Write records one JSON object a line (UTF-8, non-ASCII kept as is); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record.to_json(), ensure_ascii=False) + "\n")
    return path


def _load_dataset(source: str | Path, split: str):
    """A file through the ``datasets`` builder of its suffix (JSON, CSV, Parquet...); a folder or a Hub name
    as ``load_dataset`` takes it; a path (:func:`is_local_path`) that does not exist is a missing file."""
    import datasets

    path = Path(source).expanduser()
    if path.is_file():
        return datasets.load_dataset(str(path.parent), data_files=path.name, split="train")
    if is_local_path(source) and not path.is_dir():
        raise FileNotFoundError(
            f"preference data {str(source)!r}: no such file or folder (a Hub data set is named 'owner/name')"
        )
    return datasets.load_dataset(str(source), split=split)


def _rows(dataset, source: str | Path, split: str) -> list[PreferenceRecord]:
    where = f"{source} row" if Path(source).expanduser().is_file() else f"{source} [{split}] row"
    return [parse_record(row, f"{where} {i}") for i, row in enumerate(dataset)]


def preference_dataset(source: str | Path, split: str = "train"):
    """A checked ``datasets.Dataset`` of preference records (e.g. for TRL's ``RewardTrainer``).

    A ``.jsonl`` file is checked line by line first (so an error names its line), then loaded with
    ``datasets.load_dataset``; another file (``.json``, ``.csv``, ``.parquet``...) goes through the
    ``datasets`` builder of its suffix; a folder or a Hub name (which needs the network) goes to
    ``datasets.load_dataset`` as is. Rows that did not come from a checked ``.jsonl`` file are checked
    after loading.

    Args:
        source: a data file, a data-set folder or a Hub name such as ``"Anthropic/hh-rlhf"``.
        split: the split to load (a single file has only ``"train"``).

    Raises:
        FileNotFoundError: if a path (:func:`is_local_path`: a data-file suffix, ``./``, ``/``, ``~``...)
            does not exist; it is not asked of the Hub.
        ValueError: for a malformed record, naming the file and line (or row) and the field.
    """
    if Path(source).suffix == ".jsonl":
        read_jsonl(source)
        return _load_dataset(source, split)
    dataset = _load_dataset(source, split)
    _rows(dataset, source, split)
    return dataset


def load_preferences(source: str | Path, split: str = "train") -> list[PreferenceRecord]:
    """Preference records from a JSONL file (read directly) or from anything ``datasets`` loads.

    Args:
        source: a data file, a data-set folder or a Hub name such as ``"Anthropic/hh-rlhf"``.
        split: the split of a ``datasets`` data set.

    Raises:
        FileNotFoundError: if a path (:func:`is_local_path`: a data-file suffix, ``./``, ``/``, ``~``...)
            does not exist; it is not asked of the Hub.
        ValueError: for a malformed record, naming the file and line (or row) and the field.
    """
    if Path(source).suffix == ".jsonl":
        return read_jsonl(source)
    return _rows(_load_dataset(source, split), source, split)
