"""Peak memory of one PPO iteration (rollout + update), full fine-tuning and LoRA, each in a fresh process.

Peak resident memory (``ru_maxrss``) of a process that loads the model, builds the policy, the env's
reference (a frozen copy for full fine-tuning; the same weights with adapters off for LoRA) and the
reward model, and runs one iteration with minibatches of 4 sequences. Goals on smollm2-135m, batch 16,
48 new tokens: full <= 4 GB, LoRA <= 2.5 GB. Printed in GiB (2**30 bytes) and GB; each also with
gradient checkpointing (``LMActorCriticPolicy(gradient_checkpointing=True)``). ``--dtype bf16`` loads
every model in bfloat16 (the optimizer then steps float32 master weights).

    python benchmarks/memory.py --model smollm2-135m [--dtype bf16]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys


def child(model_name: str, lora_r: int, batch: int, new_tokens: int, checkpointing: bool, dtype: str) -> None:
    from algorithms.policy import LMActorCriticPolicy
    from algorithms.ppo import PPO
    from lm_gym.models import load_causal_lm

    model, tokenizer = load_causal_lm(model_name, dtype=dtype)
    policy = LMActorCriticPolicy(model, tokenizer, lora_r=lora_r, gradient_checkpointing=checkpointing)
    algo = PPO(policy, n_envs=batch, max_new_tokens=new_tokens, n_epochs=1, batch_size=4, verbose=0)
    algo.learn(1)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)  # KiB -> GiB


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
    peaks = {}
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
        peaks[label] = float(out[-1])
        print(f"{label:22s}: peak {peaks[label]:.2f} GiB ({peaks[label] * 2**30 / 1e9:.2f} GB)")
    print(
        f"peak GiB (minibatch 4): full {peaks['full fine-tune']:.2f}, LoRA {peaks['LoRA r=16']:.2f}; with gradient "
        f"checkpointing: full {peaks['full + checkpointing']:.2f}, LoRA {peaks['LoRA + checkpointing']:.2f}"
    )


if __name__ == "__main__":
    main()
