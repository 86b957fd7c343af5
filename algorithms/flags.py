"""``--flags`` generated from signatures and ``Args:`` docstrings, so ``--help`` and the library agree.

Every keyword argument of the class that takes it (the policy, the shared core, an algorithm) becomes one
flag, its help the argument's docstring line and its default the signature's. ``--config`` files (YAML or
JSON) give the same names, their values typed by the same flags; flags given on the command line win.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch

from algorithms.common.on_policy import OnPolicyAlgorithm

SKIP = {
    "self",
    "policy",
    "model",
    "tokenizer",
    "task",
    "reward",
    "prompts",
    "kwargs",
    "run_dir",
    "checkpoint_dir",
    "verbose",
    "stop_token_ids",
    "reference",
}


def _docstring_args(obj: Any) -> dict[str, str]:
    """``name -> help`` from a Google-style ``Args:`` section."""
    doc = inspect.getdoc(obj) or ""
    match = re.search(r"^Args:\n(.*?)(?:^\S|\Z)", doc, re.S | re.M)
    helps: dict[str, str] = {}
    name = None
    for line in (match.group(1) if match else "").splitlines():
        item = re.match(r"^    (\*{0,2}\w+)(?: \(.*?\))?: (.*)", line)
        if item:
            name = item.group(1).lstrip("*")
            helps[name] = item.group(2)
        elif name and line.startswith("        "):
            helps[name] += " " + line.strip()
    return helps


def _flag_type(annotation: str, default: Any):
    if isinstance(default, bool) or annotation == "bool":
        return None
    for name, kind in (("int", int), ("float", float), ("str", str)):
        if default is not None and type(default) is kind:
            return kind
        if annotation.split(" | ")[0] == name:
            return kind
    return str


class ParamType:
    """The ``type=`` of a flag made from a parameter: parses the command line's text as the parameter's kind.

    A ``--config`` file may also give what the annotation allows beyond one value: None (``int | None``) or
    a list (``str | list[str]``), which a command line cannot spell.

    Args:
        kind: ``int``, ``float`` or ``str``.
        annotation: the parameter's annotation, as written in the signature.
    """

    def __init__(self, kind: type, annotation: str) -> None:
        self.kind = kind
        self.__name__ = kind.__name__  # argparse's message names it: "invalid int value: 'two'"
        parts = annotation.split(" | ")
        self.nullable = "None" in parts
        self.listable = any(part.startswith("list") for part in parts)

    def __call__(self, text: str) -> Any:
        return self.kind(text)


class NumberType:
    """The ``type=`` of a numeric flag with a lower bound: a value out of range is refused, saying what is
    allowed.

    Args:
        kind: ``int`` or ``float``.
        low: the smallest value allowed.
        above: ``low`` itself is refused too, and so are infinity and NaN.
    """

    def __init__(self, kind: type, low: float, above: bool = False) -> None:
        self.kind, self.low, self.above = kind, low, above
        self.__name__ = kind.__name__  # the metavar: INT, FLOAT
        noun = "an integer" if kind is int else "a finite number" if above else "a number"
        self.allowed = f"{noun} {'>' if above else '>='} {low}"

    def __call__(self, text: str) -> Any:
        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {self.allowed}; got {text!r}") from None
        if not (value > self.low and math.isfinite(value) if self.above else value >= self.low):
            raise argparse.ArgumentTypeError(f"must be {self.allowed}; got {text}")
        return value


positive_int = NumberType(int, 1)  # counts and sizes
non_negative_int = NumberType(int, 0)  # where 0 means none
positive_float = NumberType(float, 0, above=True)  # rates and temperatures


def _init_parameters(cls: type) -> list[inspect.Parameter]:
    """The keyword arguments of ``cls.__init__``, with those it passes on through ``**kwargs`` to its bases
    (NLPO takes PPO's), up to the shared core (whose flags are added once for all algorithms)."""
    out: dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        if klass is object or (klass is OnPolicyAlgorithm and cls is not OnPolicyAlgorithm):
            break
        params = inspect.signature(klass.__init__).parameters
        out.update({name: p for name, p in params.items() if name not in out})
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            break
    return list(out.values())


def add_class_flags(
    parser: argparse.ArgumentParser, cls: type, title: str, seen: set[str] | None = None
) -> list[str]:
    """Add one ``--flag`` per keyword argument of ``cls.__init__`` (except those in ``seen``, which another
    class already added); return all the parameter names of ``cls``."""
    params = [
        p
        for p in _init_parameters(cls)
        if p.name not in SKIP and p.default is not inspect.Parameter.empty and p.kind is not p.VAR_KEYWORD
    ]
    shared = [p for p in params if seen is not None and p.name in seen]
    description = None
    if shared:  # argparse takes a flag once: list the ones defined above, with this class's defaults
        description = "also: " + ", ".join(
            f"--{p.name.replace('_', '-')} (default {p.default})" for p in shared
        )
    group = parser.add_argument_group(title, description.replace("%", "%%") if description else None)
    helps = _docstring_args(cls)
    names = [p.name for p in shared]
    for p in params:
        if p in shared:
            continue
        annotation = p.annotation if isinstance(p.annotation, str) else getattr(p.annotation, "__name__", "")
        kind = _flag_type(annotation, p.default)
        text = f"{helps.get(p.name, '')} (default: {p.default})".replace("%", "%%")  # argparse formats help
        flag = "--" + p.name.replace("_", "-")
        if kind is None:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            group.add_argument(
                flag, type=ParamType(kind, annotation), default=None, help=text, metavar=kind.__name__.upper()
            )
        names.append(p.name)
        if seen is not None:
            seen.add(p.name)
    return names


def _settings(args: argparse.Namespace, names: list[str], config: dict[str, Any]) -> dict[str, Any]:
    """Flags given on the command line win over the config file, which wins over the defaults."""
    out = {k: v for k, v in config.items() if k in names}
    out.update({k: getattr(args, k) for k in names if getattr(args, k) is not None})
    return out


_KINDS = {"int": "an integer", "float": "a number", "str": "a string"}  # what a config value should be


def flag_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """``dest -> action`` of every ``--flag`` of ``parser``: a ``--config`` key is typed by the flag of its
    name."""
    return {a.dest: a for a in parser._actions if a.option_strings}  # argparse lists them nowhere public


def load_config(path: str | None, flags: dict[str, argparse.Action]) -> dict[str, Any]:
    """The settings of a YAML or JSON ``--config`` file, typed by ``flags`` (see :func:`typed_settings`).

    Args:
        path: the file (``.json`` is read as JSON, anything else as YAML); None: no file, no settings.
        flags: ``dest -> action`` of the command's flags (:func:`flag_actions`).
    """
    if path is None:
        return {}
    import yaml  # a dependency of transformers

    text = Path(path).read_text()
    try:
        if Path(path).suffix == ".json":
            data = json.loads(text)
        else:
            data = yaml.safe_load(text) if text.strip() else {}
    except json.JSONDecodeError as err:
        raise ValueError(f"config {path}: not valid JSON: {err}") from err
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(err, "problem", None) or err
        raise ValueError(f"config {path}: not valid YAML: {problem}{at}") from err
    if not isinstance(data, dict):
        raise ValueError(f"config {path}: expected a mapping of hyperparameter names to values")
    return typed_settings(data, flags, f"config {path}")


def typed_settings(settings: dict[Any, Any], flags: dict[str, argparse.Action], where: str) -> dict[str, Any]:
    """``settings`` with each value converted as the flag of the same name converts its text.

    The flag's ``type=`` (and ``choices``) decide, so ``learning_rate: 1e-4``, which YAML reads as a string,
    becomes the float 1e-4 and ``n_envs: two`` is refused as on the command line. A ``--flag/--no-flag``
    takes ``true`` or ``false``; None and lists only where the parameter's annotation allows them
    (:class:`ParamType`). Keys with no flag of their name are kept as they are, for the caller to judge.

    Args:
        settings: names (``-`` or ``_``) to values, as a config file gives them.
        flags: ``dest -> action`` of the command's flags (:func:`flag_actions`).
        where: what errors name first, e.g. ``config run.yaml``.

    Raises:
        ValueError: a value the flag would not take, naming ``where``, the key and what is allowed.
    """
    out = {}
    for key, value in settings.items():
        name = str(key).replace("-", "_")
        action = flags.get(name)
        out[name] = value if action is None else _typed(value, action, f"{where}: {name}")
    return out


def _typed(value: Any, action: argparse.Action, where: str) -> Any:
    if action.nargs == 0:  # --flag/--no-flag, or a store_true
        if isinstance(value, bool):
            return value
        raise ValueError(f"{where}: expected true or false; got {value!r}")
    kind = action.type or str
    expected = getattr(kind, "allowed", None) or _KINDS.get(kind.__name__, kind.__name__)
    if value is None and getattr(kind, "nullable", False):
        return None
    if isinstance(value, list) and getattr(kind, "listable", False):
        return [_typed_scalar(v, action, where, expected) for v in value]
    return _typed_scalar(value, action, where, expected)


def _typed_scalar(value: Any, action: argparse.Action, where: str, expected: str) -> Any:
    if value is None or isinstance(value, (bool, list, dict)):  # str(True) would pass as a string
        raise ValueError(f"{where}: expected {expected}; got {value!r}")
    try:
        typed = (action.type or str)(str(value))
    except argparse.ArgumentTypeError as err:  # a range check's own message (NumberType)
        raise ValueError(f"{where}: {err}") from None
    except (TypeError, ValueError):
        raise ValueError(f"{where}: expected {expected}; got {value!r}") from None
    if action.choices is not None and typed not in action.choices:
        raise ValueError(f"{where}: expected one of {', '.join(map(str, action.choices))}; got {value!r}")
    return typed


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def add_device_flags(parser: argparse.ArgumentParser) -> None:
    """``--dtype`` and ``--device``, the same for every command that runs a model."""
    parser.add_argument(
        "--dtype",
        default=None,
        metavar="{bf16,fp16,fp32}",
        help="weight and compute dtype of every model (policy, reference, reward model): bf16 halves the "
        "memory (log-probs, losses and the optimizer's master weights stay float32); fp16 only for eval "
        "(training refuses it). Default fp32, or bf16 under accelerate launch --mixed_precision bf16",
    )
    parser.add_argument(
        "--device",
        default=None,
        help="cpu, cuda, cuda:1, mps... (default: this process's GPU if there is one, cuda:LOCAL_RANK under "
        "accelerate launch / torchrun; else cpu)",
    )


def device_and_dtype(device: str | None, dtype: str | None) -> tuple[torch.device, torch.dtype]:
    """Check ``--device``/``--dtype`` and fill in their defaults."""
    from algorithms.common.distributed import process_device

    if dtype is None:  # `accelerate launch --mixed_precision bf16` (or its config) asks for bf16
        dtype = "bf16" if os.environ.get("ACCELERATE_MIXED_PRECISION") == "bf16" else "fp32"
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: use one of bf16, fp16, fp32")
    if device is None:
        return process_device(), DTYPES[dtype]
    try:
        where = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r}: not a torch device (cpu, cuda, cuda:1, mps...)") from None
    if where.type == "cpu":
        return where, DTYPES[dtype]
    backend = getattr(torch, where.type, None)  # torch.cuda, torch.mps, torch.xpu...
    if not hasattr(backend, "is_available"):
        raise ValueError(f"--device {device}: lm-gym cannot run models there; use cpu, cuda, cuda:1, mps...")
    name = where.type.upper()
    if not backend.is_available():
        cuda_built = torch.version.cuda is not None or getattr(torch.version, "hip", None) is not None  # ROCm
        built = {"cuda": cuda_built, "mps": torch.backends.mps.is_built()}.get(where.type)
        why = f"torch {torch.__version__} is built without {name}" if built is False else f"no {name} device"
        raise ValueError(
            f"--device {device}: {name} is not available on this machine ({why}); use --device cpu"
        )
    if where.index is not None and where.index >= backend.device_count():
        count = backend.device_count()
        raise ValueError(f"--device {device}: this machine has {count} {name} device(s), numbered from 0")
    return where, DTYPES[dtype]


# ---------------------------------------------------------------------------------------------- commands
