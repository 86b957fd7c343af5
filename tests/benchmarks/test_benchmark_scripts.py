"""The benchmarks/ scripts run end to end on ``tiny`` with a tiny budget and end on their result line.

No timing is asserted (shared machines are noisy): these keep the scripts that back the README's performance
numbers from breaking unnoticed.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

CASES = {
    "rollout": (
        ["--batch", "2", "--new-tokens", "4", "--repeats", "1"],
        r"ratio ours/baseline: full fine-tune \d+\.\d\d, LoRA \d+\.\d\d",
    ),
    "train_step": (
        ["--batch", "2", "--new-tokens", "4", "--repeats", "1"],
        r"ratio ours/baseline: \d+\.\d\d",
    ),
    "vs_trl": (
        ["--completions", "4", "--group-size", "2", "--new-tokens", "4", "--steps", "2", "--rounds", "1"],
        r"ratio ours/trl \(GRPO, samples/s\): \d+\.\d\d",
    ),
    "vs_sb3": (
        ["--n-envs", "2", "--new-tokens", "4", "--prompt-tokens", "8", "--iterations", "1", "--epochs", "1"],
        r"ratio ours/sb3: \d+\.\d\d",
    ),
    "kl_routes": (
        [
            "--seeds",
            "1",
            "--iterations",
            "2",
            "--num-envs",
            "2",
            "--max-new-tokens",
            "4",
            "--eval-batches",
            "1",
        ],
        r"beta 0\.1: exact score [+-]\d\.\d+ ± \d\.\d+ KL [+-]\d+\.\d+ ± \d+\.\d+; entropy score .*; none score ",
    ),
    "memory": (
        ["--batch", "2", "--new-tokens", "4"],
        r"peak GiB \(minibatch \d+\): full \d+\.\d+, LoRA \d+\.\d+",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_benchmark_runs_on_tiny(name):
    args, pattern = CASES[name]
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), "--model", "tiny", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    last = out.stdout.strip().splitlines()[-1]
    assert re.fullmatch(pattern + r".*", last), last
