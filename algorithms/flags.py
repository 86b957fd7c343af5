"""``--flags`` generated from signatures and ``Args:`` docstrings, so ``--help`` and the library agree.

One generator, :func:`add_flags`, makes the settings flags of every command: each keyword argument of the
object that takes it (the policy, the shared core, an algorithm, ``SFT``, ``train_reward_model``, the
pipeline's config dataclass) becomes one flag, its help the argument's docstring entry and its default the
signature's. ``--config`` files (YAML or JSON) give the same names, their values typed by the same flags;
flags given on the command line win. The flags every model-running command shares (``--dtype``,
``--device``) and the range-checked number types are here too.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import re
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from algorithms.common.on_policy import OnPolicyAlgorithm

# Parameters that are objects or run plumbing, not settings: the commands pass them, no flag sets them.
SKIP = frozenset(
    {
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
)
# Sphinx markup of a docstring, which --help shows as plain text: :func:`~a.b` -> b, ``x`` -> x.
_ROLE = re.compile(r":\w+:`~?(?:[\w.]*\.)?([^`]+)`")


def docstring_args(obj: Any) -> dict[str, str]:
    """``name -> text`` of each entry of the Google-style ``Args:`` section of ``obj``'s docstring.

    Args:
        obj: a function or a class (a dataclass documents its fields there too).
    """
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
    return {name: _ROLE.sub(r"\1", text).replace("``", "") for name, text in helps.items()}


def parameters(obj: Any) -> list[inspect.Parameter]:
    """The parameters of a function, or of a class's ``__init__`` (a dataclass's: its fields) with those it
    passes on through ``**kwargs`` to its bases (NLPO takes PPO's), up to the shared on-policy core (whose
    flags are added once for all algorithms).

    Args:
        obj: a function or a class.
    """
    if not isinstance(obj, type):
        return list(inspect.signature(obj).parameters.values())
    out: dict[str, inspect.Parameter] = {}
    for klass in obj.__mro__:
        if klass is object or (klass is OnPolicyAlgorithm and obj is not OnPolicyAlgorithm):
            break
        params = inspect.signature(klass.__init__).parameters
        out.update({name: p for name, p in params.items() if name not in out})
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            break
    return list(out.values())


def _flag_type(annotation: str, default: Any) -> type | None:
    """The kind of value a parameter takes from its default or its annotation; None: a boolean."""
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


def add_flags(
    parser: argparse.ArgumentParser,
    obj: Any,
    title: str | None = None,
    *,
    names: Sequence[str] | None = None,
    skip: Collection[str] = SKIP,
    seen: set[str] | None = None,
    types: Mapping[str, Callable[[str], Any]] | None = None,
    flag_names: Mapping[str, str] | None = None,
    default_help: str = "default: {}",
    defaults: bool = False,
) -> list[str]:
    """Add one ``--flag`` per keyword argument of ``obj`` (a function, a class, a dataclass); return the names
    of the parameters the flags set.

    The flag of ``learning_rate`` is ``--learning-rate``; its help is the parameter's entry in the ``Args:``
    section followed by its default; its value is parsed as the annotation says (``--flag/--no-flag`` for a
    boolean) and is None unless given, so that a config file or a preset can fill in what the command line
    leaves out (:func:`given_settings`); with ``defaults``, the parameter's default.

    Args:
        parser: where the flags go.
        obj: whose parameters become flags.
        title: the help's section of the flags (None: the command's own options).
        names: these parameters only, in this order (default: every keyword argument with a default that is
            not in ``skip``).
        skip: parameters that get no flag (without ``names``): objects and plumbing the command passes.
        seen: names another call already made flags of: they get none here, and the section's description
            lists them with ``obj``'s defaults; the new ones are added to it.
        types: the ``type=`` of a parameter's flag instead of its annotation's kind (a range check such as
            :data:`positive_int`).
        flag_names: a flag's name other than the parameter's (``{"learning_rate": "lr"}``: ``--lr``).
        default_help: how the help ends, ``{}`` standing for the default (a preset's: ``"default: the
            preset's"``).
        defaults: a flag not given is the parameter's default instead of None, for a command with no config
            file or preset to fill it in.
    """
    by_name = {p.name: p for p in parameters(obj)}
    if names is None:
        params = [
            p
            for p in by_name.values()
            if p.name not in skip and p.default is not inspect.Parameter.empty and p.kind is not p.VAR_KEYWORD
        ]
    else:
        params = [by_name[name] for name in names]
    shared = [p for p in params if seen is not None and p.name in seen]
    group: Any = parser
    if title is not None:
        description = None
        if shared:  # argparse takes a flag once: list the ones defined above, with this class's defaults
            description = "also: " + ", ".join(
                f"--{p.name.replace('_', '-')} (default {p.default})" for p in shared
            )
        group = parser.add_argument_group(title, description.replace("%", "%%") if description else None)
    helps: dict[str, str] = {}
    for klass in obj.__mro__ if isinstance(obj, type) else (obj,):  # the first class that documents a name
        helps = {**docstring_args(klass), **helps}
    types, flag_names = types or {}, flag_names or {}
    out = [p.name for p in shared]
    for p in params:
        if p in shared:
            continue
        annotation = p.annotation if isinstance(p.annotation, str) else getattr(p.annotation, "__name__", "")
        kind = _flag_type(annotation, p.default)
        end = default_help.format(p.default)
        default = p.default if defaults else None
        text = f"{helps.get(p.name, '')} ({end})".replace("%", "%%")  # argparse formats help with %
        flag = "--" + flag_names.get(p.name, p.name).replace("_", "-")
        if kind is None:
            group.add_argument(
                flag, dest=p.name, action=argparse.BooleanOptionalAction, default=default, help=text
            )
        else:
            kind_of_flag = types.get(p.name) or ParamType(kind, annotation)
            metavar = kind_of_flag.__name__.upper()
            group.add_argument(
                flag, dest=p.name, type=kind_of_flag, default=default, help=text, metavar=metavar
            )
        out.append(p.name)
        if seen is not None:
            seen.add(p.name)
    return out


def given_settings(
    args: argparse.Namespace, names: Iterable[str], config: Mapping[str, Any]
) -> dict[str, Any]:
    """The settings of ``names`` that are given: a flag on the command line wins over the config file, which
    wins over the defaults (left out).

    Args:
        args: the parsed command line (a flag not given is None).
        names: the parameters wanted.
        config: the config file's settings (:func:`load_config`).
    """
    names = list(names)
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
