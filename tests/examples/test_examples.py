"""The examples/ scripts run end to end on the ``tiny`` model with a tiny budget (one subprocess each)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

CASES = {
    "random_agent": (
        ["--episodes", "1", "--max-new-tokens", "6"],
        [r"score [+-]\d", r"step-1 info: .*'score'"],
    ),
    "custom_reward": (
        ["--num-envs", "2", "--max-new-tokens", "6"],
        [r"direct call: \[1\.5\]", r"\[0\] score [+-]\d", r"\[1\] score [+-]\d", r"called \d+ times"],
    ),
    "reinforce_from_scratch": (
        ["--iterations", "2", "--num-envs", "2", "--max-new-tokens", "6", "--task", "letters"],
        [r"iter 0: mean score \+0\.\d*[1-9].* mean KL", r"iter 1: mean score"],
    ),
    "ppo_sentiment": (
        ["--iterations", "2", "--n-envs", "2", "--max-new-tokens", "6", "--task", "letters"],
        [r"rollout/rm_score", r"mean eval score before [+-]\d\.\d+\s+after [+-]\d\.\d+"],
    ),
    "sb3_ppo": (
        ["--steps", "24", "--n-envs", "2", "--n-steps", "6", "--max-new-tokens", "6", "--task", "letters"],
        # the finished texts' score, and the per-token KL (SB3's sampling log-prob against info["ref_log_prob"])
        [
            r"timesteps 12: \d+ texts finished, mean score [+-]\d.*KL per token [+-]\d",
            r"policy_gradient_loss",
        ],
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_example_runs_on_tiny(name, tmp_path):
    args, patterns = CASES[name]
    if name == "ppo_sentiment":
        args = [*args, "--run-dir", str(tmp_path / "run")]
    # One torch thread: a ~0.3M-parameter model gains nothing from more, and on a shared machine extra
    # threads only spin against other jobs.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        [sys.executable, f"examples/{name}.py", "--model", "tiny", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, f"{name} failed:\n{result.stdout}\n{result.stderr}"
    for pattern in patterns:
        assert re.search(pattern, result.stdout), f"{name}: no {pattern!r} in stdout:\n{result.stdout}"
    if name == "ppo_sentiment":
        assert (tmp_path / "run" / "final" / "config.json").exists()


def test_examples_are_documented():
    """Every example has a module docstring with a run line, and accepts --model."""
    for path in sorted((ROOT / "examples").glob("*.py")):
        text = path.read_text()
        assert text.startswith('"""'), path.name
        assert f"python examples/{path.name}" in text, path.name
        assert '"--model", default="smollm2-135m"' in text, path.name
