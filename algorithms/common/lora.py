"""LoRA adapters (Hu et al. 2021, through ``peft``): set up in one place for the policy and for SFT.

With LoRA only the adapters train and the base weights stay frozen, so the frozen reference of the KL
penalty is the same model with its adapters switched off (:meth:`~algorithms.policy.LMActorCriticPolicy.
reference`), and :mod:`algorithms.shared_pass` runs reference and policy rows in one forward pass.
"""

from __future__ import annotations

import copy

from torch import nn

from lm_gym.kinds import model_kind

__all__ = ["ADAPTER", "add_lora", "merged"]

ADAPTER = "default"  # the adapter's name (peft's default)


def add_lora(
    model: nn.Module,
    r: int,
    alpha: int = 32,
    target_modules: str | list[str] = "all-linear",
    adapter_name: str = ADAPTER,
) -> nn.Module:
    """``model`` made ready to train: with ``r > 0`` a peft model with LoRA adapters of rank ``r`` on
    ``target_modules`` (no dropout), its base weights frozen; with ``r = 0`` the model itself with every
    weight trainable (full fine-tuning), the meaning of 0 in every ``lora_r`` setting.

    The adapters are initialised from torch's global RNG, with ``B = 0``: the model computes what it did.

    Args:
        model: a causal or encoder-decoder ``transformers`` LM.
        r: LoRA rank; 0 trains every weight.
        alpha: scaling numerator (``alpha / r`` scales the update).
        target_modules: the modules that get adapters (``"all-linear"``: every linear layer but the head).
        adapter_name: the adapter's name in the peft model.
    """
    if r == 0:
        return model.requires_grad_(True)
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules=target_modules,
        task_type=model_kind(model).peft_task_type,
    )
    return get_peft_model(model, config, adapter_name=adapter_name)  # freezes the base weights


def merged(model: nn.Module) -> nn.Module:
    """What to export of ``model``: a copy with its LoRA adapters merged into the weights (a plain
    ``transformers`` model that loads without peft), or ``model`` itself when it has none."""
    return copy.deepcopy(model).merge_and_unload() if hasattr(model, "merge_and_unload") else model
