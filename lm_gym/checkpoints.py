"""Checkpoint folders that a crash cannot corrupt, shared by every training loop (RL, SFT, reward model).

A checkpoint is a folder ``ROOT/NAME`` (names sort in training order, e.g. ``iter_000004``) staged under a
hidden name and renamed into place only when complete; ``ROOT/latest`` names the newest one and is replaced
atomically, and older folders are pruned only after that. A crash mid-write leaves the previous checkpoint
intact. Tensors go into safetensors or ``torch.save`` files that ``torch.load(weights_only=True)`` reads;
the rest (counters, RNG states, history) into JSON. With several data-parallel processes the main process
writes, and every process's torch RNG state is kept, so each restores its own.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "check_same_settings",
    "latest_checkpoint",
    "load_training_state",
    "load_weights",
    "restore_rng_state",
    "rng_state",
    "save_training_state",
    "write_checkpoint",
    "write_json_atomic",
]


def write_checkpoint(root: str | Path, name: str, write: Callable[[Path], None], keep: int | None) -> Path:
    """Stage ``write(folder)`` in a hidden folder, rename it to ``root/name``, point ``root/latest`` at it,
    then keep only the ``keep`` newest checkpoint folders (None = all); return ``root/name``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".staging_{name}_{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    write(staging)
    final = root / name
    if final.exists():
        shutil.rmtree(final)
    staging.rename(final)  # readers see a complete checkpoint or none
    latest = root / "latest.tmp"
    latest.write_text(name)
    os.replace(latest, root / "latest")
    if keep is not None:  # only once the new one is complete and named latest; never the new one
        others = [c for c in _checkpoints(root) if c != final]
        for old in others[: max(len(others) - (keep - 1), 0)]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(root: str | Path) -> Path | None:
    """The folder ``root/latest`` names, else the last complete one (a crash between two renames), else None."""
    root = Path(root)
    pointer = root / "latest"
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if named.is_dir():
            return named
    found = _checkpoints(root)
    return found[-1] if found else None


def _checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def write_json_atomic(path: str | Path, data: Any) -> Path:
    """Write ``data`` as JSON through a temporary file and a rename: the old file or the new one, never half."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)
    return path


def rng_state(group: Any) -> dict[str, Any]:
    """Every process's torch RNG state (a collective: every process calls it), for a checkpoint's JSON:
    ``torch_rng`` (the main process's), ``world_size`` and, with several, ``torch_rng_by_process``."""
    states = group.gather(torch.get_rng_state().tolist())
    out: dict[str, Any] = {"torch_rng": states[0], "world_size": group.world_size}
    if group.world_size > 1:
        out["torch_rng_by_process"] = states
    return out


def restore_rng_state(state: Mapping[str, Any], group: Any, path: str | Path) -> None:
    """Set this process's torch RNG state from :func:`rng_state`'s record; warn when the checkpoint was
    written by another number of processes (training goes on, but not as the uninterrupted run would)."""
    if state.get("world_size", 1) != group.world_size:
        warnings.warn(
            f"checkpoint {path} was written by {state.get('world_size', 1)} process(es) and is resumed by "
            f"{group.world_size}: training goes on, but not as the uninterrupted run would (each process's "
            "seeds depend on its rank)",
            RuntimeWarning,
            stacklevel=3,
        )
    states = state.get("torch_rng_by_process", [state["torch_rng"]])
    rng = states[group.rank] if group.rank < len(states) else state["torch_rng"]
    torch.set_rng_state(torch.tensor(rng, dtype=torch.uint8))


def check_same_settings(saved: Mapping[str, Any], current: Mapping[str, Any], where: str, hint: str) -> None:
    """Refuse to resume with settings other than the run's: a one-line ``ValueError`` naming the first one
    that differs (compared as JSON, so a tuple equals its list)."""
    normal = lambda v: json.loads(json.dumps(v, default=str))  # noqa: E731
    for key in sorted(set(saved) | set(current)):
        old, new = normal(saved.get(key)), normal(current.get(key))
        if old != new:
            raise ValueError(f"{where} was run with {key}={old!r}, now {new!r}: {hint}")


def load_weights(
    file: str | Path, expected: Iterable[str], device: str | torch.device, what: str = "model"
) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors checkpoint file, refused (one-line ``ValueError``) unless their names are
    exactly ``expected``: a checkpoint of another model, or of LoRA for a full fine-tune, does not fit."""
    from safetensors.torch import load_file

    file = Path(file)
    weights = load_file(file, device=str(device))
    expected = set(expected)
    if set(weights) != expected:
        missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise ValueError(
            f"checkpoint {file.parent} does not fit this {what}: missing {missing[:3]}, unexpected {extra[:3]}"
        )
    return weights


def save_training_state(
    folder: Path,
    params: Mapping[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: Mapping[str, Any],
) -> None:
    """Write a supervised loop's checkpoint into ``folder`` (a :func:`write_checkpoint` staging folder): the
    trained ``params`` (safetensors), the optimizer's and the learning-rate scheduler's states (read back with
    ``weights_only=True``) and ``state`` (JSON: counters, history, RNG states)."""
    from safetensors.torch import save_file

    save_file({k: p.detach().contiguous() for k, p in params.items()}, folder / "model.safetensors")
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    torch.save(scheduler.state_dict(), folder / "scheduler.pt")
    (folder / "state.json").write_text(json.dumps(dict(state), default=str))


def load_training_state(
    checkpoint: Path,
    params: Mapping[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    device: str | torch.device,
) -> dict[str, Any]:
    """Restore what :func:`save_training_state` wrote into ``params``, ``optimizer`` and ``scheduler``; return
    the JSON ``state``."""
    weights = load_weights(checkpoint / "model.safetensors", params, device)
    with torch.no_grad():
        for k, value in weights.items():
            params[k].copy_(value)
    optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt", weights_only=True))
    return json.loads((checkpoint / "state.json").read_text())
