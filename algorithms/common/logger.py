"""Metrics to the console, TensorBoard and ``metrics.jsonl``, with SB3's namespaced keys."""

from __future__ import annotations

import json
import math
from pathlib import Path

__all__ = ["Logger"]


class Logger:
    """Collects ``key -> value`` for one iteration, then writes them everywhere at :meth:`dump`.

    Keys are namespaced as in stable-baselines3: ``rollout/...``, ``train/...``, ``time/...``.

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
        if self.run_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(str(self.run_dir / "tensorboard"))

    def record(self, key: str, value: float) -> None:
        self.values[key] = float(value)

    def text(self, tag: str, markdown: str, step: int) -> None:
        """A block of text (e.g. a table of sample generations) for TensorBoard and ``samples.md``."""
        if self._writer is not None:
            self._writer.add_text(tag, markdown, step)
            with open(self.run_dir / "samples.md", "a", encoding="utf-8") as f:
                f.write(f"\n## {tag}, iteration {step}\n\n{markdown}\n")

    def dump(self, step: int) -> dict[str, float]:
        """Write the recorded values for ``step`` and start a new set."""
        values, self.values = {"iteration": step, **self.values}, {}
        self.history.append(values)
        if self._writer is not None:
            for key, value in values.items():
                if key != "iteration" and math.isfinite(value):
                    self._writer.add_scalar(key, value, step)
            self._writer.flush()
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
