"""``--flags`` generated from signatures and ``Args:`` docstrings, so ``--help`` and the library agree.

Every keyword argument of the class that takes it (the policy, the shared core, an algorithm) becomes one
flag, its help the argument's docstring line and its default the signature's. ``--config`` files (YAML or
JSON) give the same names; flags given on the command line win.
"""

from __future__ import annotations

import argparse
import inspect
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
            group.add_argument(flag, type=kind, default=None, help=text, metavar=kind.__name__.upper())
        names.append(p.name)
        if seen is not None:
            seen.add(p.name)
    return names


def _settings(args: argparse.Namespace, names: list[str], config: dict[str, Any]) -> dict[str, Any]:
    """Flags given on the command line win over the config file, which wins over the defaults."""
    out = {k: v for k, v in config.items() if k in names}
    out.update({k: getattr(args, k) for k in names if getattr(args, k) is not None})
    return out


def _load_config(path: str | None) -> dict[str, Any]:
    if path is None:
        return {}
    import yaml  # a dependency of transformers

    text = Path(path).read_text()
    data = yaml.safe_load(text) if text.strip() else {}
    if not isinstance(data, dict):
        raise ValueError(f"config {path}: expected a mapping of hyperparameter names to values")
    return {k.replace("-", "_"): v for k, v in data.items()}


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
    if where.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine")
    return where, DTYPES[dtype]


# ---------------------------------------------------------------------------------------------- commands
