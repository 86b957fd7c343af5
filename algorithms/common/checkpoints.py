"""Checkpoint folders that a crash cannot corrupt, and the run folders that hold them, shared by every
training loop (RL, SFT, reward model).

A checkpoint is a folder ``ROOT/NAME`` (names sort in training order, e.g. ``iter_000004``) staged under a
hidden name and renamed into place only when complete, with a manifest of its files' sizes;
``ROOT/latest`` names the newest one and is replaced atomically, and older folders are pruned only after
that. A crash or a full disk mid-write leaves the previous checkpoints intact, and the staging folder is
removed by the next write; a checkpoint damaged later (a truncated or missing file) is passed over, with a
warning, for the one before it. Weights that hold NaN or inf are never written. Tensors go into safetensors
or ``torch.save`` files that ``torch.load(weights_only=True)`` reads; the rest (counters, RNG states,
history) into JSON. With several data-parallel processes the main process writes, and every process's
torch RNG state is kept, so each restores its own.

:func:`prepare_run_dir` checks a command's output folder before a run: a finished run there is continued
(``--resume``) or replaced (``--overwrite``), never mixed with a new one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from algorithms.common.distributed import is_main_process
from algorithms.common.nonfinite import check_finite

__all__ = [
    "check_same_settings",
    "latest_checkpoint",
    "load_weights",
    "prepare_run_dir",
    "restore_rng_state",
    "rng_state",
    "save_weights",
    "write_checkpoint",
    "write_folder",
    "write_json_atomic",
]

MANIFEST = "manifest.json"  # in every checkpoint: its files' sizes, to tell a damaged checkpoint
STAGING = ".staging_"  # prefix of the hidden folders a checkpoint is written in before its rename


def write_checkpoint(root: str | Path, name: str, write: Callable[[Path], None], keep: int | None) -> Path:
    """Write a checkpoint ``root/name`` with :func:`write_folder`, point ``root/latest`` at it, then keep only
    the ``keep`` newest checkpoint folders (None = all); return ``root/name``.

    Folders whose names sort after ``name`` are removed as well: they belong to a run that this one replaced
    by resuming from an earlier checkpoint.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    _remove_staging(root)  # a crashed write's

    def write_with_manifest(staging: Path) -> None:
        write(staging)
        sizes = {
            str(f.relative_to(staging)): f.stat().st_size for f in sorted(staging.rglob("*")) if f.is_file()
        }
        (staging / MANIFEST).write_text(json.dumps(sizes))

    final = write_folder(root / name, write_with_manifest)
    latest = root / "latest.tmp"
    latest.write_text(name)
    os.replace(latest, root / "latest")
    # only once the new one is complete and named latest; never the new one
    existing = _checkpoints(root)
    others = [c for c in existing if c.name < name]
    stale = [c for c in existing if c.name > name]
    if keep is not None:
        stale += others[: max(len(others) - (keep - 1), 0)]
    for old in stale:
        shutil.rmtree(old, ignore_errors=True)
    return final


def write_folder(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Stage ``write(folder)`` in a hidden folder beside ``path`` and rename it to ``path`` (replacing an older
    one) only when complete: readers find a complete folder or none. A failure (a full disk, weights refused
    by :func:`check_finite`) removes the staging folder and leaves everything else as it was; an ``OSError``
    is raised again with a message naming ``path``."""
    path = Path(path)
    staging = path.parent / f"{STAGING}{path.name}_{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir()
        write(staging)
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(err, OSError):
            reason = err.strerror or str(err)
            message = f"{path} not written ({reason}); what was there before is intact"
            raise (OSError(err.errno, message) if err.errno is not None else OSError(message)) from err
        raise
    if path.exists():
        shutil.rmtree(path)
    staging.rename(path)  # readers see a complete folder or none
    return path


def _remove_staging(root: str | Path) -> None:
    """Remove what a crashed write left in ``root``: staging folders and the half-written ``latest``."""
    root = Path(root)
    if not root.is_dir():
        return
    for leftover in root.glob(f"{STAGING}*"):
        shutil.rmtree(leftover, ignore_errors=True)
    (root / "latest.tmp").unlink(missing_ok=True)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The folder ``root/latest`` names, else the last complete one (a crash between two renames), else None;
    a damaged one (a file missing or of another size than written) is passed over with a warning."""
    root = Path(root)
    found = _checkpoints(root)[::-1]  # newest first
    pointer = root / "latest"
    if pointer.is_file():  # the one it names first
        named = root / pointer.read_text().strip()
        found.sort(key=lambda c: c != named)
    damaged = []
    for checkpoint in found:
        problem = _damage(checkpoint)
        if problem is None:
            if damaged:
                _warn_damaged(damaged, f"resuming from {checkpoint.name}")
            return checkpoint
        damaged.append(f"{checkpoint.name}: {problem}")
    if damaged:
        _warn_damaged(damaged, "no intact checkpoint is left")
    return None


def _damage(checkpoint: Path) -> str | None:
    """What is wrong with a checkpoint folder by its manifest; None when it is intact or has no manifest (one
    written before manifests)."""
    manifest = checkpoint / MANIFEST
    if not manifest.is_file():
        return None
    try:
        sizes = json.loads(manifest.read_text())
    except ValueError:
        return f"{MANIFEST} is unreadable"
    for name, size in sizes.items():
        file = checkpoint / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, {size} were written"
    return None


def _warn_damaged(damaged: list[str], outcome: str) -> None:
    warnings.warn(
        f"damaged checkpoint(s) passed over ({'; '.join(damaged)}): {outcome}", RuntimeWarning, stacklevel=3
    )


def _checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def prepare_run_dir(
    path: str | Path, *, resume: bool, overwrite: bool, flag: str, markers: Sequence[str] = ()
) -> Path:
    """Check the folder a command writes its run into, and make it ready; return it.

    Refused with a one-line ``ValueError``: an empty name, a path that is a file, a folder that cannot be
    written, ``resume`` with ``overwrite``, and, without ``resume``, a folder that holds a run already (a
    checkpoint in ``path/checkpoints``, or one of the ``markers``: what a finished run leaves) unless
    ``overwrite``, which deletes that folder first. What a crashed checkpoint write left is removed. With
    several data-parallel processes only the main one deletes, creates and tests the folder.

    Args:
        path: the folder.
        resume: the run continues the one in the folder.
        overwrite: a run in the folder is deleted first.
        flag: the command-line option that named the folder, for the messages (``--run-dir``).
        markers: names of files or folders in ``path`` whose presence means a run is there.
    """
    if str(path).strip() == "":
        raise ValueError(f"{flag} is empty: name the folder of the run")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} is a file: name a folder")
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other: continue the run, or replace it")
    holds_run = bool(_checkpoints(path / "checkpoints")) or any((path / m).exists() for m in markers)
    replace = holds_run and not resume
    if replace and not overwrite:
        raise ValueError(
            f"{flag} {path} holds a run already: continue it with --resume, or replace it with --overwrite"
        )
    if replace and Path.cwd().resolve().is_relative_to(path.resolve()):
        raise ValueError(f"--overwrite would delete {path}, which holds the working directory")
    if not is_main_process() or (resume and not path.is_dir()):
        return path  # the main process deletes and creates; with nothing to resume, the trainer says so
    if replace:
        shutil.rmtree(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):  # the folder is writable
            pass
    except OSError as err:
        raise ValueError(f"{flag} {path} cannot be written ({err.strerror or err})") from None
    _remove_staging(path)
    _remove_staging(path / "checkpoints")
    return path


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


def save_weights(tensors: Mapping[str, torch.Tensor], file: Path) -> None:
    """Write ``tensors`` to a safetensors ``file``, refused (``ValueError``) when one holds NaN or inf."""
    from safetensors.torch import save_file

    check_finite(tensors, "checkpoint")
    save_file({k: t.detach().contiguous() for k, t in tensors.items()}, file)
