"""TRPO: trust region policy optimisation (Schulman et al. 2015), for language models.

Each rollout gives the actor one step that maximises the surrogate under a trust region
(Schulman et al. 2015, eq. 14, with the mean KL of section 6):

    maximise   L(theta) = mean_t[ pi_theta(a_t|s_t) / pi_old(a_t|s_t) * A_t ]
    subject to KL(theta) = mean_t[ KL(pi_old(.|s_t) || pi_theta(.|s_t)) ] <= target_kl

With g the gradient of L and H the Hessian of the mean KL at theta_old (its Fisher matrix), the direction
s = H^-1 g comes from conjugate gradient on Hessian-vector products (appendix C), the full step
sqrt(2 * target_kl / s^T H s) * s reaches the border of the quadratic trust region, and a backtracking line
search shrinks it until the surrogate improves and the exact KL is within ``target_kl`` (no step if no try
passes). The critic is fitted afterwards, separately, with the actor frozen.

For a language model the KL is exact: over the whole vocabulary under the policy's law (the tempered
softmax; top-k/top-p filter the draw but are not part of the law, so the KL is always finite: see
:mod:`lm_gym.sampling`), averaged over every action of the rollout; the old distributions are computed once per
update, without gradient. Every pass runs over minibatches of ``batch_size`` segments and sums their
surrogates, gradients, Hessian-vector products and KLs, so activations never exceed one minibatch's (what
grows with the rollout: the old (M, V) log-probs, and a few vectors of the actor's size for conjugate
gradient and the saved parameters). Derivatives are taken over the actor's trainable parameters only:
all LM weights, or just the adapters with LoRA.

Sources: Schulman et al. 2015, "Trust Region Policy Optimization"; sb3-contrib's ``trpo.py``, whose
``conjugate_gradient_solver`` and ``flat_grad`` are used as they are, and whose defaults are kept (see
:class:`TRPO` for what changes for LMs).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from sb3_contrib.common.utils import conjugate_gradient_solver, flat_grad
from torch.nn.attention import SDPBackend, sdpa_kernel

from algorithms.common.buffer import SequenceBatch
from algorithms.common.on_policy import OnPolicyAlgorithm
from algorithms.common.trainer import check_arg
from algorithms.policy import LMActorCriticPolicy

__all__ = ["TRPO"]


class TRPO(OnPolicyAlgorithm):
    """Trust region policy optimisation on TextGen-v1: one natural-gradient step of the actor per rollout.

    Defaults are sb3-contrib's TRPO (15 CG steps, damping 0.1, line search shrinking by 0.8 over 10 tries,
    target KL 0.01, 10 critic epochs). Adapted to LMs: ``batch_size`` counts episode segments per forward
    pass and only bounds memory (sb3-contrib takes the whole rollout at once for the actor);
    ``fisher_subsample`` is sb3-contrib's ``sub_sampling_factor`` as a fraction; the critic's AdamW rate is
    the shared ``learning_rate`` (sb3-contrib: 1e-3, for small networks); with the default shared trunk only
    the value head is fitted, on detached hidden states, so the critic cannot move the actor past the KL
    that the line search accepted.

    Args:
        policy: the actor-critic to train.
        batch_size: episode segments per forward pass (memory only: the sums over the rollout are the same).
        target_kl: trust-region radius, the largest mean per-token KL(old || new) of an accepted step (0.01).
        cg_max_steps: conjugate-gradient iterations for the natural-gradient direction (15, sb3-contrib).
        cg_damping: added to the KL Hessian's diagonal for stable conjugate gradient (0.1, sb3-contrib).
        line_search_shrinking_factor: the step's shrink factor per rejected line-search try (0.8).
        line_search_max_iter: line-search tries before the step is given up (10, sb3-contrib).
        n_critic_updates: epochs of critic regression on the returns per rollout (10, sb3-contrib).
        fisher_subsample: share of the (shuffled) minibatches for the Hessian-vector products (1.0 = all).
        **kwargs: the shared settings of :class:`~algorithms.common.on_policy.OnPolicyAlgorithm`;
            ``learning_rate`` and ``max_grad_norm`` apply to the critic only.
    """

    def __init__(
        self,
        policy: LMActorCriticPolicy,
        *,
        batch_size: int = 8,
        target_kl: float = 0.01,
        cg_max_steps: int = 15,
        cg_damping: float = 0.1,
        line_search_shrinking_factor: float = 0.8,
        line_search_max_iter: int = 10,
        n_critic_updates: int = 10,
        fisher_subsample: float = 1.0,
        **kwargs,
    ) -> None:
        check_arg("batch_size", batch_size, lambda v: int(v) == v and v >= 1, "an integer >= 1")
        check_arg("target_kl", target_kl, lambda v: v > 0, "> 0")
        check_arg("cg_max_steps", cg_max_steps, lambda v: int(v) == v and v >= 1, "an integer >= 1")
        check_arg("cg_damping", cg_damping, lambda v: v >= 0, ">= 0")
        check_arg(
            "line_search_shrinking_factor", line_search_shrinking_factor, lambda v: 0 < v < 1, "in (0, 1)"
        )
        check_arg(
            "line_search_max_iter", line_search_max_iter, lambda v: int(v) == v and v >= 1, "an integer >= 1"
        )
        check_arg("n_critic_updates", n_critic_updates, lambda v: int(v) == v and v >= 1, "an integer >= 1")
        check_arg("fisher_subsample", fisher_subsample, lambda v: 0 < v <= 1, "in (0, 1]")
        super().__init__(policy, **kwargs)
        self.batch_size, self.target_kl = batch_size, target_kl
        self.cg_max_steps, self.cg_damping = cg_max_steps, cg_damping
        self.line_search_shrinking_factor = line_search_shrinking_factor
        self.line_search_max_iter = line_search_max_iter
        self.n_critic_updates, self.fisher_subsample = n_critic_updates, fisher_subsample
        # The actor (LM weights or adapters) steps by hand; the optimizer holds the critic only (value head,
        # and the critic's trunk if separate), so the core's checkpoints and lr schedule apply to it.
        self.actor_params = [p for p in policy.model.parameters() if p.requires_grad]
        actor = {id(p) for p in self.actor_params}
        self.trainer = self.make_trainer(
            [p for p in policy.parameters() if p.requires_grad and id(p) not in actor]
        )

    def train(self) -> None:
        buffer, policy = self.buffer, self.policy
        if self.normalize_advantage:
            buffer.whiten_advantages()
        rng = np.random.default_rng(self._iteration_seed(self.iteration))
        pad = policy.tokenizer.pad_token_id
        batches = list(buffer.minibatches(self.batch_size, rng, policy.device, pad))
        n_actions = buffer.n_steps * buffer.n_envs

        # pi_old, once: recomputed teacher-forced, so the ratio is exactly 1 at theta_old and the surrogate
        # and the KL are measured against the same distributions
        with torch.no_grad():
            old = [self._evaluate(batch) for batch in batches]  # (old_log_prob (M,), entropy (M,), (M, V))
        entropy = sum(float(o[1].sum()) for o in old) / n_actions

        # surrogate and its gradient g, summed over minibatches of sum(ratio * A) / n_actions
        surrogate, gradient = 0.0, torch.zeros(())
        for batch, (old_log_prob, _, _) in zip(batches, old):
            log_prob, _, _ = self._evaluate(batch)
            ratio = torch.exp(log_prob - old_log_prob)
            term = (ratio * batch.advantages).sum() / n_actions
            gradient = gradient + flat_grad(term, self.actor_params)
            surrogate += term.item()
        # data parallel: every process takes the same step from the averages over all processes' rollouts
        gradient = self.all_reduce_mean(torch.as_tensor(gradient, dtype=torch.float32))
        surrogate = float(self.all_reduce_mean(torch.tensor([surrogate], device=gradient.device))[0])

        # tries: shrinks before the accepted step (line_search_max_iter when none was accepted)
        accepted, tries, kl, new_surrogate = False, self.line_search_max_iter, 0.0, surrogate
        finite = bool(np.isfinite(surrogate) and torch.isfinite(gradient).all())
        if finite:
            n_fisher = max(1, round(self.fisher_subsample * len(batches)))
            full_step = self._natural_step(gradient, batches[:n_fisher], [o[2] for o in old[:n_fisher]])
            finite = bool(torch.isfinite(full_step).all())
        if not finite:  # as apply_gradients: a NaN/inf surrogate, gradient or step never reaches the weights
            self._skipped_updates += 1
        else:
            with torch.no_grad():
                theta_old = torch.cat([p.reshape(-1) for p in self.actor_params])
                # backtracking line search (Schulman et al. 2015, appendix C): accept the first shrunk step
                # that improves the surrogate within the trust region
                for i in range(self.line_search_max_iter):
                    _assign(self.actor_params, theta_old + self.line_search_shrinking_factor**i * full_step)
                    trial_surrogate, trial_kl = self._surrogate_and_kl(batches, old, n_actions)
                    if trial_kl <= self.target_kl and trial_surrogate > surrogate:
                        accepted, tries, kl, new_surrogate = True, i, trial_kl, trial_surrogate
                        break
                if not accepted:
                    _assign(self.actor_params, theta_old)

        # the critic, separately: 0.5 * (V - R)^2 by minibatch, with the actor frozen
        value_losses = []
        with _frozen(self.actor_params):
            if policy.critic_trunk is None:
                # shared trunk: only the head learns, on hidden states that do not change; compute them once
                features = [(self._head_inputs(batch), batch.returns) for batch in batches]  # (M, H), (M,)
                for _ in range(self.n_critic_updates):
                    for i in rng.permutation(len(features)):
                        hidden, returns = features[i]
                        values = policy.value_head(hidden)[:, 0]  # (M,)
                        value_loss = 0.5 * ((values - returns) ** 2).mean()
                        self.apply_gradients(value_loss)
                        value_losses.append(value_loss.item())
            else:
                for _ in range(self.n_critic_updates):
                    for batch in buffer.minibatches(self.batch_size, rng, policy.device, pad):
                        _, _, values = policy.evaluate_actions(batch, entropy_grad=False)  # (M,)
                        value_loss = 0.5 * ((values - batch.returns) ** 2).mean()
                        self.apply_gradients(value_loss)
                        value_losses.append(value_loss.item())

        log = self.logger.record
        log("train/policy_loss", -new_surrogate)
        log("train/value_loss", np.mean(value_losses))
        log("train/entropy", entropy)
        log("train/approx_kl", kl)
        log("train/line_search_steps", tries)
        log("train/step_accepted", float(accepted))
        log("train/explained_variance", buffer.explained_variance())
        log("train/skipped_updates", self._skipped_updates)

    @torch.no_grad()
    def _head_inputs(self, batch: SequenceBatch) -> torch.Tensor:
        """(M, H) what the value head reads for the batch's actions (the trunk's hidden states)."""
        captured = []
        hook = self.policy.value_head.register_forward_hook(lambda m, args, out: captured.append(args[0]))
        try:
            self._evaluate(batch)
        finally:
            hook.remove()
        return captured[0]

    def _evaluate(self, batch: SequenceBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """log_prob (M,), entropy (M,) and the log-probs of every token (M, V) for the batch's actions."""
        log_prob, entropy, _, log_probs_all = self.policy.evaluate_actions(
            batch, entropy_grad=False, return_log_probs_all=True
        )
        return log_prob, entropy, log_probs_all

    def _natural_step(
        self, gradient: torch.Tensor, batches: list[SequenceBatch], old_log_probs_all: list[torch.Tensor]
    ) -> torch.Tensor:
        """The full step sqrt(2 delta / s^T H s) * s with s = H^-1 g (Schulman et al. 2015, appendix C)."""
        n_fisher = sum(len(o) for o in old_log_probs_all)

        def kl_gradient(batch: SequenceBatch, old_all: torch.Tensor) -> torch.Tensor:
            # the fused attention kernels have no second derivative; the plain "math" one has. The backward passes
            # run under it too: with gradient checkpointing they recompute the layers (the first derivative, and
            # again each Hessian-vector product), and a recomputation must take the forward's kernel
            with sdpa_kernel(SDPBackend.MATH):
                _, _, log_probs_all = self._evaluate(batch)
                kl = _exact_kl(old_all, log_probs_all).sum() / n_fisher
                return flat_grad(kl, self.actor_params, create_graph=True, retain_graph=True)

        # one minibatch: keep its first-derivative graph for every product; several: rebuild each one per
        # product, so that only one minibatch's graph is alive at a time
        cached = kl_gradient(batches[0], old_log_probs_all[0]) if len(batches) == 1 else None

        def hessian_vector_product(vector: torch.Tensor) -> torch.Tensor:
            product = torch.zeros_like(vector)
            for batch, old_all in zip(batches, old_log_probs_all):
                grad_kl = cached if cached is not None else kl_gradient(batch, old_all)
                with sdpa_kernel(SDPBackend.MATH):  # the recomputation of gradient checkpointing (above)
                    product += flat_grad(
                        (grad_kl * vector).sum(), self.actor_params, retain_graph=cached is not None
                    )
            return self.all_reduce_mean(product) + self.cg_damping * vector  # the Fisher of all processes

        # sb3-contrib's solver starts from a little noise: seed it per iteration (same run, resumable)
        with torch.random.fork_rng(devices=[gradient.device] if gradient.device.type == "cuda" else []):
            torch.manual_seed(self._iteration_seed(self.iteration))
            direction = conjugate_gradient_solver(
                hessian_vector_product, gradient, max_iter=self.cg_max_steps
            )
        s_h_s = direction @ hessian_vector_product(direction)
        return torch.sqrt(2 * self.target_kl / s_h_s) * direction

    def _surrogate_and_kl(
        self,
        batches: list[SequenceBatch],
        old: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
        n_actions: int,
    ) -> tuple[float, float]:
        """Surrogate and mean exact KL to pi_old of the current actor over the rollout (no gradient)."""
        surrogate = kl = 0.0
        for batch, (old_log_prob, _, old_all) in zip(batches, old):
            log_prob, _, log_probs_all = self._evaluate(batch)
            surrogate += float((torch.exp(log_prob - old_log_prob) * batch.advantages).sum()) / n_actions
            kl += float(_exact_kl(old_all, log_probs_all).sum()) / n_actions
            if kl > self.target_kl and self.world_size == 1:  # KL terms are >= 0: the partial sum rejects
                break
        both = self.all_reduce_mean(torch.tensor([surrogate, kl], device=self.policy.device))
        return float(both[0]), float(both[1])


def _exact_kl(old_log_probs_all: torch.Tensor, log_probs_all: torch.Tensor) -> torch.Tensor:
    """(M,) KL(old || new) = sum_v p_old(v) (log p_old(v) - log p_new(v)) from (M, V) log-probs; tokens
    outside the old law's support (p_old = 0) add 0."""
    old_probs = old_log_probs_all.exp()
    return torch.where(old_probs > 0, old_probs * (old_log_probs_all - log_probs_all), 0.0).sum(-1)


def _assign(params: Sequence[torch.nn.Parameter], flat: torch.Tensor) -> None:
    """Copy a flat vector into the parameters in place (every reference to them sees the new values)."""
    offset = 0
    for p in params:
        p.copy_(flat[offset : offset + p.numel()].view_as(p))
        offset += p.numel()


@contextmanager
def _frozen(params: Sequence[torch.nn.Parameter]) -> Iterator[None]:
    """No gradient to ``params`` in the block: a forward through them builds no graph for them."""
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)
