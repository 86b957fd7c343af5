"""Metrics to the console, TensorBoard and ``metrics.jsonl``, with SB3's namespaced keys."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

__all__ = ["Logger"]

SAMPLES_HEADING = re.compile(r"^## .*, iteration (\d+)$", re.M)  # a table's heading in samples.md


class Logger:
    """Collects ``key -> value`` for one iteration, then writes them everywhere at :meth:`dump`.

    Keys are namespaced as in stable-baselines3: ``rollout/...``, ``train/...``, ``time/...``. A run's first
    write drops what an earlier run logged in the same folder after the step this one starts from (0, or the
    checkpoint's with :meth:`resume`), in ``metrics.jsonl``, ``samples.md`` and TensorBoard (``purge_step``):
    no step appears twice.

    Args:
        run_dir: where ``metrics.jsonl`` and the TensorBoard events go; None keeps everything in memory.
        verbose: 1 prints a table per dump, 0 prints nothing.
    """

    def __init__(self, run_dir: str | Path | None, verbose: int = 1) -> None:
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.verbose = verbose
        self.values: dict[str, float] = {}
        self.history: list[dict[str, float]] = []
        self._writer = None
        self._start = 0  # the step this run continues from

    def resume(self, step: int) -> None:
        """Continue from ``step`` (a checkpoint's): what was logged after it is dropped at the next write."""
        self.close()
        self._writer, self._start = None, step

    def _open(self):
        """The TensorBoard writer, opened at the first write, when the records after the start are dropped."""
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.run_dir.mkdir(parents=True, exist_ok=True)
            _truncate_metrics(self.run_dir / "metrics.jsonl", self._start)
            _truncate_samples(self.run_dir / "samples.md", self._start)
            # TensorBoard hides the events of steps >= purge_step written before this session
            self._writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=self._start + 1)
        return self._writer

    def record(self, key: str, value: float) -> None:
        self.values[key] = float(value)

    def text(self, tag: str, markdown: str, step: int) -> None:
        """A block of text (e.g. a table of sample generations) for TensorBoard and ``samples.md``."""
        if self.run_dir is not None:
            self._open().add_text(tag, markdown, step)
            with open(self.run_dir / "samples.md", "a", encoding="utf-8") as f:
                f.write(f"\n## {tag}, iteration {step}\n\n{markdown}\n")

    def dump(self, step: int) -> dict[str, float]:
        """Write the recorded values for ``step`` and start a new set."""
        values, self.values = {"iteration": step, **self.values}, {}
        self.history.append(values)
        if self.run_dir is not None:
            writer = self._open()
            for key, value in values.items():
                if key != "iteration":  # NaN too (an undefined explained variance): a gap, not a lost key
                    writer.add_scalar(key, value, step)
            writer.flush()
            with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(values) + "\n")
        if self.verbose:
            width = max(len(k) for k in values)
            lines = [f"| {k:<{width}} | {v:>12.5g} |" for k, v in sorted(values.items())]
            rule = "-" * len(lines[0])
            print("\n".join([rule, *lines, rule]))
        return values

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the rows of ``metrics.jsonl`` up to ``step`` (and none that a crash cut short)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["iteration"] <= step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue
    _replace(path, "".join(kept))


def _truncate_samples(path: Path, step: int) -> None:
    """Cut ``samples.md`` before its first table of an iteration after ``step``."""
    if not path.is_file():
        return
    text = path.read_text(encoding="utf-8")
    later = [m.start() for m in SAMPLES_HEADING.finditer(text) if int(m.group(1)) > step]
    if later:
        _replace(path, text[: max(later[0] - 1, 0)])  # the blank line before the heading goes too


def _replace(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
