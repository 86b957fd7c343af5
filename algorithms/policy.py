"""The batched language-model actor-critic.

One causal LM is the actor; a value head on its last hidden state is the critic (a separate critic trunk
is an option). Sampling is KV-cached and batched. The policy's law is the tempered softmax over the whole
vocabulary; top-k and top-p restrict which tokens are drawn but are not part of the log-probs (as in TRL
and verl: see :mod:`lm_gym.sampling`), so the log-probs of the rollout, of the env's KL penalty and of
:meth:`LMActorCriticPolicy.evaluate_actions` (whole sequences in one teacher-forced forward pass) are all
``log softmax(logits / temperature)``, finite for every token. With LoRA (``peft``) the frozen reference is the
same model with its adapters switched off: no second copy of the weights.

An encoder-decoder LM (T5-style) works the same way (RL4LMs' seq2seq policies): the observations carry the
source and the decoder prefix, sampling encodes each source once (:class:`lm_gym.seq2seq.Seq2SeqDecoder`),
the value head reads the decoder's last hidden state, and ``evaluate_actions`` runs the decoder over the
generated sequences. The policy's :attr:`~LMActorCriticPolicy.kind` (:mod:`lm_gym.kinds`) decides every such
difference; the code here is written once for both.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedModel, PreTrainedTokenizerBase

from algorithms.common.buffer import SequenceBatch
from algorithms.common.lora import ADAPTER, add_lora, merged
from algorithms.shared_pass import shared_lora_decoder
from lm_gym.decoding import RowDecoder
from lm_gym.kinds import load_lm, model_kind
from lm_gym.sampling import policy_warpers, sample, sampling_filters

__all__ = ["LMActorCriticPolicy", "RolloutAgent"]


class LMActorCriticPolicy(nn.Module):
    """Actor-critic around a causal LM, or an encoder-decoder LM (``model.config.is_encoder_decoder``).

    Args:
        model: the LM to fine-tune (its weights are trained unless ``lora_r > 0``).
        tokenizer: its tokenizer.
        lora_r: LoRA rank; 0 trains every weight. With LoRA only the adapters (and the value head) train,
            and the reference is this model with the adapters off. The adapters are initialised from torch's
            global RNG (``from_pretrained`` seeds it with its ``seed``).
        lora_alpha: LoRA scaling numerator (``alpha / r`` scales the update).
        lora_target_modules: modules that get adapters (``"all-linear"`` by default).
        separate_critic: give the critic its own copy of the trunk instead of sharing the actor's.
        gradient_checkpointing: recompute each layer's activations in the backward pass instead of storing
            them: less memory for one more forward pass of the layers (``benchmarks/memory.py`` measures the
            saving); the values and gradients are the same.
        temperature: the policy's temperature: its law is ``softmax(logits / temperature)``.
        top_k: draw among the k most likely tokens (0 = off); a sampling filter, not part of the log-probs.
        top_p: draw among the nucleus of this mass (1.0 = off); a sampling filter, not part of the log-probs.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        lora_r: int = 0,
        lora_alpha: int = 32,
        lora_target_modules: str | list[str] = "all-linear",
        separate_critic: bool = False,
        gradient_checkpointing: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
    ) -> None:
        super().__init__()
        if lora_r < 0:
            raise ValueError(f"lora_r must be >= 0 (0 = full fine-tuning); got {lora_r}")
        self.tokenizer = tokenizer
        # the policy's law (temperature) and the filter of the draw (top-k, top-p): lm_gym.sampling
        self.law, self.filters = policy_warpers(temperature), sampling_filters(top_k, top_p)
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.lora_r = lora_r
        model.eval()  # dropout off for good: RL on LMs trains with it off (Ziegler et al.; TRL)
        self.model = model = add_lora(model, lora_r, lora_alpha, lora_target_modules, ADAPTER)
        # causal or encoder-decoder (lm_gym.kinds): it answers every question on which the two differ
        self.kind = model_kind(model)
        self.gradient_checkpointing = gradient_checkpointing
        if gradient_checkpointing:
            # transformers checkpoints only in train mode; with every dropout at 0 that mode changes nothing else
            _zero_dropout(model)
            # transformers 5.2x renamed it activation checkpointing (the old name warns, and goes in v6)
            enable = getattr(model, "activation_checkpointing_enable", None)
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self._logits_to_keep = "logits_to_keep" in inspect.signature(base.forward).parameters
        hidden = model.config.hidden_size
        self.critic_trunk = copy.deepcopy(model).requires_grad_(True) if separate_critic else None
        self.value_head = nn.Linear(hidden, 1)
        nn.init.zeros_(self.value_head.weight)  # V = 0 at the start: no random critic noise in the first GAE
        nn.init.zeros_(self.value_head.bias)
        self.value_head.to(self.device)
        self.eval()

    @classmethod
    def from_pretrained(
        cls,
        name: str,
        *,
        seed: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        **settings,
    ) -> LMActorCriticPolicy:
        """Load ``name`` (``tiny``, ``tiny-t5``, ``smollm2-135m``, a folder or a Hub id; causal or T5-style)
        with :mod:`lm_gym.models` and wrap it; ``settings`` are this class's keyword arguments. ``seed`` also
        seeds the LoRA adapters' initialisation (the global RNG is left untouched)."""
        model, tokenizer = load_lm(name, seed=seed, device=device, dtype=dtype)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return cls(model, tokenizer, **settings)

    # ------------------------------------------------------------------------------------------ basics
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the LM computes in (its weights'); the value head, LoRA adapters and every log-prob,
        entropy and loss stay float32."""
        return next(self.model.parameters()).dtype

    @property
    def adapter(self) -> str | None:
        """Name of the LoRA adapter, or None when every weight trains."""
        return ADAPTER if self.lora_r > 0 else None

    def train(self, mode: bool = True) -> LMActorCriticPolicy:
        """Dropout stays off in every submodule; only the bookkeeping flag follows ``mode``."""
        self.training = mode
        return self

    @contextmanager
    def reference(self) -> Iterator[nn.Module]:
        """The frozen reference (LoRA only): the same model with its adapters off, for the block's duration."""
        if self.adapter is None:
            raise RuntimeError("without LoRA the reference is a separate frozen copy (see reference_copy())")
        with self.model.disable_adapter():
            yield self.model

    def reference_copy(self) -> PreTrainedModel:
        """A frozen deep copy of the current model, the reference of full fine-tuning."""
        if self.adapter is not None:
            raise RuntimeError("with LoRA the reference is the model with adapters off (see reference())")
        return copy.deepcopy(self.model).requires_grad_(False).eval()

    def env_reference(
        self, num_rows: int, reference: nn.Module | None = None
    ) -> tuple[nn.Module, RowDecoder | None]:
        """What an env of ``num_rows`` rows steps as the reference of its KL penalty: ``(model, decoder)`` for
        ``TextGenVectorEnv(model=model, reference_decoder=decoder)``.

        With LoRA, the policy's own model and a shared-pass decoder (:mod:`algorithms.shared_pass`) whose rows
        run it with the adapters off while its twin rows are the policy: give the decoder to
        :meth:`rollout_agent` too. Without, ``reference`` (default: a frozen copy of the policy now) and no
        decoder (the env builds its own).

        Args:
            num_rows: the env's number of rows.
            reference: the frozen model of full fine-tuning's KL (e.g. the initial model of iterated RLHF).
        """
        if self.adapter is None:
            return (reference if reference is not None else self.reference_copy()), None
        if reference is not None:
            raise ValueError(
                "reference: with LoRA the reference is the model with its adapters off; pass none"
            )
        return self.model, shared_lora_decoder(
            self.model, num_rows, self.tokenizer.pad_token_id, self.adapter
        )

    # ------------------------------------------------------------------------------------------ acting
    def rollout_agent(
        self, num_rows: int, generator: torch.Generator | None = None, shared: RowDecoder | None = None
    ) -> RolloutAgent:
        """A KV-cached agent that samples actions and reports log-probs and values for ``num_rows`` envs.

        With LoRA and ``shared``, the env's reference decoder from :mod:`algorithms.shared_pass`, the agent
        reads the policy's logits and hidden states from that shared forward pass instead of running its own.
        """
        return RolloutAgent(self, num_rows, generator, shared)

    # ------------------------------------------------------------------------------------------ learning
    def evaluate_actions(
        self, batch: SequenceBatch, *, entropy_grad: bool = True, return_log_probs_all: bool = False
    ) -> tuple[torch.Tensor, ...]:
        """Log-probs, entropies and values of the actions in whole sequences, in one teacher-forced pass.

        Args:
            batch: the sequences and their actions, as
                :meth:`~algorithms.common.buffer.RolloutBuffer.minibatches` yields them: ``action_mask``
                (B, L) marks the tokens of the text (a causal LM's whole sequence, an encoder-decoder's
                decoder sequence) that were actions, and ``action_masks`` (M, V), if not None, the tokens each
                action was allowed among (NLPO's masks, in ``action_mask.nonzero()`` order): the others are
                set to -inf after the temperature, so log-probs and entropy are those of the masked law. The
                per-action arrays (``old_log_prob``, ...) are not read.
            entropy_grad: keep the entropy in the autograd graph (needed only for an entropy bonus;
                without it the (M, V) tensors of the entropy are freed at once).
            return_log_probs_all: also return the (M, V) log-probs of every token under the policy's law
                (for an exact KL between two policies, as TRPO needs).

        Returns:
            log_prob, entropy, value: each (M,) for the M actions, in ``action_mask.nonzero()`` order;
            ``value`` is the critic's estimate of the state *before* each action. With
            ``return_log_probs_all``, a fourth item: log_probs_all (M, V).
        """
        logits, hidden, context, actions, inputs = self._teacher_forced(
            self.model, batch, hidden=self.critic_trunk is None
        )
        log_prob, entropy, log_probs_all = self._law_log_probs(
            context, logits, actions, batch.action_masks, entropy_grad
        )
        if hidden is None:
            rows, cols = batch.action_mask[:, 1:].nonzero(as_tuple=True)  # (M,), (M,)
            checkpointing = self.gradient_checkpointing and torch.is_grad_enabled()
            with _train_mode(self.critic_trunk, checkpointing):
                out = self.critic_trunk(**{**inputs, "output_hidden_states": True})
                hidden = self.kind.last_hidden_states(out)[rows, cols]
        value = self.value_head(hidden.to(self.value_head.weight.dtype))[:, 0]
        if return_log_probs_all:
            return log_prob, entropy, value, log_probs_all
        return log_prob, entropy, value

    @torch.no_grad()
    def reference_log_probs(self, batch: SequenceBatch, reference: nn.Module | None = None) -> torch.Tensor:
        """(M,) log-probs of the batch's actions under the reference, in one teacher-forced pass: with LoRA the
        model with its adapters off, else ``reference`` (a frozen model of the same tokenizer). The law is the
        policy's (its temperature), the one the rollout's log-probs are under, so the two compare token by token.

        Args:
            batch: sequences and actions as for :meth:`evaluate_actions`.
            reference: the frozen model of full fine-tuning (None with LoRA).
        """
        if self.adapter is not None:
            if reference is not None:
                raise ValueError(
                    "reference: with LoRA the reference is the model with its adapters off; pass none"
                )
            with self.reference():
                logits, _, context, actions, _ = self._teacher_forced(self.model, batch, hidden=False)
        elif reference is None:
            raise ValueError(
                "reference_log_probs needs the frozen reference model without LoRA (reference_copy())"
            )
        else:
            logits, _, context, actions, _ = self._teacher_forced(reference, batch, hidden=False)
        return self._law_log_probs(context, logits, actions, batch.action_masks, entropy_grad=False)[0]

    def _teacher_forced(
        self, model: nn.Module, batch: SequenceBatch, *, hidden: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """One forward pass of ``model`` over the batch's sequences: the logits that predicted each action
        (M, V) float32, the trunk's last hidden state where each was taken (M, H) if ``hidden``, each action's
        preceding token (M, 1), the actions (M,), and the model's inputs (for a separate critic trunk)."""
        text = self.kind.text(batch)  # (B, L) the sequences the action mask is over
        # the logits/hidden state at position j-1 predict/evaluate the action at position j
        rows, cols = batch.action_mask[:, 1:].nonzero(as_tuple=True)  # (M,), (M,)
        # no logits are needed before the first action: skip the prompt's where the model allows it
        first = int(cols.min()) if self._logits_to_keep else 0
        keep = {"logits_to_keep": text.shape[1] - first} if self._logits_to_keep else {}
        inputs = {
            **self.kind.forward_inputs(batch),
            "output_hidden_states": hidden,
            "use_cache": False,  # one pass: no KV cache to build (and none allowed with checkpointing)
        }
        checkpointing = self.gradient_checkpointing and torch.is_grad_enabled() and model is self.model
        with _train_mode(model, checkpointing):  # transformers checkpoints only in train mode
            out = model(**inputs, **keep)
        logits = out.logits[rows, cols - first].float()  # (M, V)
        states = self.kind.last_hidden_states(out)[rows, cols] if hidden else None  # (M, H)
        del out  # the (B, L, V) logits are not needed past this point
        return logits, states, text[rows, cols][:, None], text[rows, cols + 1], inputs

    def _law_log_probs(
        self,
        context: torch.Tensor,
        logits: torch.Tensor,
        actions: torch.Tensor,
        action_masks: torch.Tensor | None,
        entropy_grad: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """log_prob (M,), entropy (M,) and log_probs_all (M, V) of ``actions`` under the policy's law: the
        temperature (given each action's preceding token, ``context`` (M, 1)) and NLPO's ``action_masks``."""
        scores = self.law(context, logits) if self.law else logits  # the law of the rollout's log-probs
        if action_masks is not None:
            scores = scores.masked_fill(~action_masks, float("-inf"))  # (M, V)
        log_probs_all = torch.log_softmax(scores, dim=-1)  # (M, V)
        log_prob = log_probs_all.gather(1, actions[:, None])[:, 0]
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            probs = log_probs_all.exp()
            entropy = -(probs * torch.where(probs > 0, log_probs_all, 0.0)).sum(-1)  # (M,)
        return log_prob, entropy, log_probs_all

    # ------------------------------------------------------------------------------------------ export
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The parameters that training changes (LoRA adapters or all weights, and the critic)."""
        return {name: p.detach() for name, p in self.named_parameters() if p.requires_grad}

    def save_pretrained(self, directory: str | Path) -> None:
        """Export the policy as a plain ``transformers`` folder (LoRA merged in) plus the value head.

        ``AutoModelForCausalLM.from_pretrained(directory)`` (``AutoModelForSeq2SeqLM`` for an
        encoder-decoder) loads the fine-tuned model; ``value_head.safetensors`` holds the critic's head.
        """
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        merged(self.model).save_pretrained(directory, safe_serialization=True)
        self.tokenizer.save_pretrained(directory)
        save_file(
            {k: v.contiguous() for k, v in self.value_head.state_dict().items()},
            directory / "value_head.safetensors",
        )


@contextmanager
def _train_mode(model: nn.Module, on: bool) -> Iterator[None]:
    """Train mode for the block when ``on``, where gradient checkpointing looks for it; eval mode again after it.

    transformers checkpoints a layer (a ``GradientCheckpointingLayer``: Llama/SmolLM2's decoder layers, T5's
    blocks) only when ``layer.gradient_checkpointing and layer.training``, so only those layers switch; the
    modules inside them (attention, MLP, dropout, LoRA) stay in eval mode. That matters because the backward pass
    recomputes the layers after this block has ended, in eval mode: a module that reads ``self.training`` would
    recompute a different graph, which torch's checkpoint rejects (T5's attention, which also carries a
    ``gradient_checkpointing`` flag, marks its zero position bias ``requires_grad`` in train mode). A model
    without such layers (older style: the stack checkpoints its layers) switches every flagged module. KV-cached
    sampling needs eval mode (transformers drops the cache of a checkpointed layer in train mode)."""
    if not on:
        yield
        return
    from transformers.modeling_layers import GradientCheckpointingLayer

    flagged = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    gates = [m for m in flagged if isinstance(m, GradientCheckpointingLayer)] or flagged
    for module in gates:
        module.training = True  # this module only (train() would recurse into its submodules)
    try:
        yield
    finally:
        for module in gates:
            module.training = False


def _zero_dropout(model: nn.Module) -> None:
    """Every dropout probability to 0, so that train mode (for gradient checkpointing) adds no noise: dropout
    modules, the float rates that attention modules keep from their config (``T5Attention.dropout``,
    ``LlamaAttention.attention_dropout``: read only in train mode), and the config's (and sub-configs') rates."""
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):  # Dropout, Dropout1d/2d/3d, AlphaDropout
            module.p = 0.0
        for key, value in list(vars(module).items()):
            if "dropout" in key and isinstance(value, float):
                setattr(module, key, 0.0)
    configs = [model.config]
    while configs:
        config = configs.pop()
        for key, value in list(vars(config).items()):
            if "dropout" in key and isinstance(value, float):
                setattr(config, key, 0.0)
            elif hasattr(value, "to_dict") and hasattr(value, "model_type"):  # a sub-config (text_config)
                configs.append(value)


class RolloutAgent:
    """Samples for N environments: actions, their log-probs under the policy's law, and state values.

    Args:
        policy: the actor-critic.
        num_rows: N.
        generator: ``torch.Generator`` for the sampling.
        shared: the shared-pass decoder the env steps as its reference (:mod:`algorithms.shared_pass`, LoRA):
            its twin rows are the policy's, at the env's current observations.
    """

    def __init__(
        self,
        policy: LMActorCriticPolicy,
        num_rows: int,
        generator: torch.Generator | None,
        shared: RowDecoder | None = None,
    ):
        self.policy = policy
        self.generator = generator
        self.shared = shared
        pad, kind = policy.tokenizer.pad_token_id, policy.kind
        # a BatchedDecoder, or a Seq2SeqDecoder for an encoder-decoder (each source encoded once)
        self.decoder = None if self.shared else kind.decoder(policy.model, num_rows, pad, keep_hidden=True)
        self.critic = (
            kind.decoder(policy.critic_trunk, num_rows, pad, keep_hidden=True)
            if policy.critic_trunk
            else None
        )
        self._last_actions: torch.Tensor | None = None
        self._entropy_sum, self._entropy_count = 0.0, 0

    def _hidden_and_logits(self, obs: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.shared is not None:
            logits, hidden = self.shared.twin_logits, self.shared.hidden
        else:
            self.policy.kind.follow(self.decoder, obs, self._last_actions)
            logits, hidden = self.decoder.logits, self.decoder.hidden
        if self.critic is not None:
            self.policy.kind.follow(self.critic, obs, self._last_actions)
            hidden = self.critic.hidden
        return logits, hidden

    def _values(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self.policy.value_head
        return head(hidden.to(head.weight.dtype))[:, 0]

    @torch.no_grad()
    def act(self, obs: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns actions (N,), log_probs (N,) and values (N,) for the observations."""
        return self.act_with_processor(obs, None)[:3]

    @torch.no_grad()
    def act_with_processor(
        self, obs: dict[str, np.ndarray], processor: LogitsProcessor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Like :meth:`act`, with the policy's law further changed by ``processor`` (applied after the
        temperature and before the top-k/top-p filter, e.g. NLPO's action mask: the filter then keeps
        tokens inside the mask, so the draw never has an empty support).

        Returns:
            actions (N,); their log-probs under the policy's law, ``processor`` included (N,); values
            (N,); and their log-probs under the policy's law without ``processor`` (N,), e.g. for the KL
            penalty. Without ``processor`` the two log-probs are the same tensor.
        """
        logits, hidden = self._hidden_and_logits(obs)  # (N, V), (N, H)
        last = self.policy.kind.last_tokens(obs, logits.device)  # (N, 1)
        law = self.policy.law
        if processor is not None:
            law = LogitsProcessorList([*law, processor])
        actions, log_probs, entropy = sample(logits, last, law, self.policy.filters, self.generator)
        unprocessed = log_probs
        if processor is not None:
            scores = self.policy.law(last, logits.clone()) if self.policy.law else logits  # (N, V)
            unprocessed = torch.log_softmax(scores, dim=-1).gather(1, actions[:, None])[:, 0]
        self._entropy_sum += float(entropy.sum())
        self._entropy_count += len(entropy)
        self._last_actions = actions
        return actions, log_probs, self._values(hidden), unprocessed

    @torch.no_grad()
    def value(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        """(N,) the critic's values of the observations (to bootstrap unfinished episodes)."""
        _, hidden = self._hidden_and_logits(obs)
        return self._values(hidden).double().cpu().numpy()

    @property
    def mean_entropy(self) -> float:
        """Mean entropy (nats) of the policy's laws (NLPO: masked) at the steps so far."""
        return self._entropy_sum / max(1, self._entropy_count)
