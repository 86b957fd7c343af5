"""Peak memory of one PPO iteration (rollout + update), full fine-tuning and LoRA, each in a fresh process.

Peak resident memory (``ru_maxrss``) of a process that loads the model, builds the policy, the env's
reference (a frozen copy for full fine-tuning; the same weights with adapters off for LoRA) and the
reward model, and runs one iteration with minibatches of 4 sequences. Goals on smollm2-135m, batch 16,
48 new tokens: full <= 4 GB, LoRA <= 2.5 GB. Printed in GiB (2**30 bytes) and GB; each also with
gradient checkpointing (``LMActorCriticPolicy(gradient_checkpointing=True)``), and what checkpointing saves.
``--dtype bf16`` loads every model in bfloat16 (the optimizer then steps float32 master weights).

Checkpointing shrinks only the update (the activations kept for the backward pass), so on Linux each run also
reports the peak of its two phases: loading + rollout, and the update alone (the kernel's peak-RSS counter,
``VmHWM``, reset through ``/proc/self/clear_refs`` just before the update). The process peak is the larger.

    python benchmarks/memory.py --model smollm2-135m [--dtype bf16]
"""

from __future__ import annotations

import argparse
import math
import resource
import subprocess
import sys


def _peak_since_reset() -> float:
    """VmHWM, the peak resident memory since start or the last reset, in GiB (NaN where /proc is missing)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20  # KiB -> GiB
    except OSError:
        pass
    return math.nan


def _reset_peak() -> bool:
    """Reset VmHWM to the current resident memory (Linux >= 4.0); False where that is impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def child(model_name: str, lora_r: int, batch: int, new_tokens: int, checkpointing: bool, dtype: str) -> None:
    from algorithms.policy import LMActorCriticPolicy
    from algorithms.ppo import PPO
    from lm_gym.models import load_causal_lm

    model, tokenizer = load_causal_lm(model_name, dtype=dtype)
    policy = LMActorCriticPolicy(model, tokenizer, lora_r=lora_r, gradient_checkpointing=checkpointing)
    algo = PPO(policy, n_envs=batch, max_new_tokens=new_tokens, n_epochs=1, batch_size=4, verbose=0)
    phases = {"rollout": math.nan, "update": math.nan}
    update = algo.train

    def measured_update() -> None:  # learn() calls it after the rollout (and after trimming the C heap)
        phases["rollout"] = _peak_since_reset()  # loading + rollout
        reset = _reset_peak()
        update()
        phases["update"] = _peak_since_reset() if reset else math.nan

    algo.train = measured_update
    algo.learn(1)
    # a reset lowers ru_maxrss too (it reads the same counter): the process peak is the larger phase's
    peak = max(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, *(p for p in phases.values() if p == p)
    )
    print(peak, phases["rollout"], phases["update"])  # GiB


def _saving(without: float, with_: float) -> str:
    if not (without == without and with_ == with_):  # NaN: no phase peaks on this OS
        return "n/a"
    return f"{without - with_:.2f} GiB ({(without - with_) / without:.0%})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.model, args.child, args.batch, args.new_tokens, args.checkpointing, args.dtype)
        return
    peaks, rollouts, updates = {}, {}, {}
    configs = (
        ("full fine-tune", 0, False),
        ("LoRA r=16", 16, False),
        ("full + checkpointing", 0, True),
        ("LoRA + checkpointing", 16, True),
    )
    for label, lora_r, checkpointing in configs:
        cmd = [sys.executable, __file__, "--model", args.model, "--batch", str(args.batch)]
        cmd += ["--new-tokens", str(args.new_tokens), "--dtype", args.dtype, "--child", str(lora_r)] + [
            "--checkpointing"
        ] * checkpointing
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()
        peaks[label], rollouts[label], updates[label] = (float(x) for x in out[-1].split())
        print(
            f"{label:22s}: peak {peaks[label]:.2f} GiB ({peaks[label] * 2**30 / 1e9:.2f} GB); "
            f"load + rollout {rollouts[label]:.2f} GiB, update {updates[label]:.2f} GiB"
        )
    for name, base, checkpointed in (
        ("full fine-tune", "full fine-tune", "full + checkpointing"),
        ("LoRA r=16", "LoRA r=16", "LoRA + checkpointing"),
    ):
        print(
            f"checkpointing saves ({name}): peak {_saving(peaks[base], peaks[checkpointed])}, "
            f"update {_saving(updates[base], updates[checkpointed])}"
        )
    print(
        f"peak GiB (minibatch 4): full {peaks['full fine-tune']:.2f}, LoRA {peaks['LoRA r=16']:.2f}; with gradient "
        f"checkpointing: full {peaks['full + checkpointing']:.2f}, LoRA {peaks['LoRA + checkpointing']:.2f} "
        f"(saves {_saving(peaks['full fine-tune'], peaks['full + checkpointing'])} and "
        f"{_saving(peaks['LoRA r=16'], peaks['LoRA + checkpointing'])})"
    )


if __name__ == "__main__":
    main()
