"""The shared core of the critic-free group methods (GRPO, RLOO, REINFORCE++): group rollouts, where the KL
goes, dynamic sampling, and the clipped update over whole texts.

An algorithm subclasses :class:`CriticFreeAlgorithm` and writes only :meth:`~CriticFreeAlgorithm.advantages`,
its estimator (the loss is :func:`~algorithms.common.group.policy_loss`, whose aggregation, clipping and
importance level are settings here). Everything else (seeding, logging, checkpoints, data parallel, LoRA,
bf16) is the on-policy core's (:class:`~algorithms.common.on_policy.OnPolicyAlgorithm`).
"""

from __future__ import annotations

import inspect
import time
from typing import Any, NamedTuple

import numpy as np
import torch
from gymnasium.vector import AutoresetMode

from algorithms.common.buffer import RolloutBuffer
from algorithms.common.group import kl_penalty, policy_loss, zero_std_groups
from algorithms.common.on_policy import OnPolicyAlgorithm
from algorithms.common.trainer import check_arg
from algorithms.policy import LMActorCriticPolicy

__all__ = ["CriticFreeAlgorithm", "GroupBatch", "GroupRollout"]

# Settings of the on-policy core that describe a critic (GAE) or its rollout, which these methods do not have.
CRITIC_SETTINGS = ("gamma", "gae_lambda", "whiten_rewards", "normalize_advantage", "n_steps", "reward_clip")


def _core_setting(kwargs: dict[str, Any], name: str) -> Any:
    """A setting of the on-policy core as given in ``kwargs``, else the core's default."""
    return kwargs.get(name, inspect.signature(OnPolicyAlgorithm.__init__).parameters[name].default)


def _first_texts(columns: np.ndarray, lengths: np.ndarray) -> list[tuple[int, int, int]]:
    """The buffer segments ``(column, 0, length - 1)`` of the first texts of ``columns``."""
    return [(int(c), 0, int(length) - 1) for c, length in zip(columns, lengths)]


class GroupRollout(NamedTuple):
    """The texts an update trains on: one per buffer column, groups of ``group_size`` consecutive entries."""

    columns: np.ndarray  # (B,) the buffer column of each text (its first text, steps 0 .. length - 1)
    lengths: np.ndarray  # (B,) actions per text
    scores: np.ndarray  # (B,) the task's reward of each text (the outcome, without any KL)
    truncated: np.ndarray  # (B,) bool: the text hit the length limit without a stop token


class GroupBatch(NamedTuple):
    """What an advantage estimator sees: the rollout's texts as (B,) and (B, T) tensors (float32)."""

    scores: torch.Tensor  # (B,) the outcome reward of each text
    rewards: (
        torch.Tensor
    )  # (B,) each text's whole reward: the score, minus beta * sum of k1 with the KL in the reward
    token_rewards: (
        torch.Tensor
    )  # (B, T) per token: the KL part (in the reward) and the score at the last token
    mask: torch.Tensor  # (B, T) 1 on each text's tokens
    group_size: int  # G: texts per prompt, consecutive rows


class CriticFreeAlgorithm(OnPolicyAlgorithm):
    """Critic-free policy gradient over groups of texts per prompt, on TextGen-v1.

    **Rollouts.** The env runs with ``group_size=G``: at each iteration's reset the G consecutive rows of each
    block start from one seeded prompt draw. Each row's first text is its sample; the rollout stops when every
    row's first text has ended (a row that ends earlier restarts, same-step, and its later text is dropped:
    only a reset starts whole groups). Groups never span data-parallel processes (``n_envs`` is a multiple of
    G in each), so group statistics need no communication; what is global (batch std, REINFORCE++'s
    normalisation, the loss's counts) is reduced over the processes.

    **Where the KL goes** (``kl_placement``; beta is ``kl_coef``, steered by ``kl_target`` if set):

    * ``"reward"``: the env pays the per-token k1 penalty ``-beta (log pi - log pi_ref)``, run step by step
      with the reference (RLOO's and REINFORCE++'s choice). A sequence-level estimator (GRPO, RLOO) sees each
      text's sum, ``score - beta * KL``; REINFORCE++ sees the tokens.
    * ``"loss"``: the env never runs the reference (``per_token_reference=False``); one teacher-forced pass
      of the reference over the finished texts gives ``log pi_ref``, and ``beta * k`` (``kl_estimator`` k1,
      k2 or k3, per token) joins the loss (GRPO's choice, with k3).
    * ``kl_coef=0`` without ``kl_target``: no reference model at all, in either placement (TRL's GRPO
      default, DAPO): the env never runs one, none is copied, and ``rollout/kl`` is not measured.

    **Update.** ``n_epochs`` passes over the texts; each optimizer step takes ``batch_size`` texts (default:
    all of them, one on-policy step as in TRL's defaults) through forward passes of ``micro_batch_size`` texts
    whose gradients add up. Its loss is :func:`~algorithms.common.group.policy_loss`, aggregated over the
    whole step on every process (``aggregation``).

    Args:
        policy: the actor (its value head is not used or trained).
        group_size: G, texts per prompt; ``n_envs`` must be a multiple of it.
        n_epochs: passes over each rollout (GRPO's mu).
        batch_size: texts per optimizer step (None = the whole rollout).
        micro_batch_size: texts per forward pass inside a step (memory only: the step is the same).
        eps_low: the ratio is clipped below at ``1 - eps_low``.
        eps_high: the ratio is clipped above at ``1 + eps_high`` (DAPO's clip-higher: 0.28).
        aggregation: ``"grpo"`` (per-text token mean, then the mean over texts), ``"dr_grpo"`` (sum over
            tokens divided by texts times ``max_new_tokens``) or ``"dapo"`` (one mean over every token).
        importance: ``"token"`` ratios (PPO, GRPO) or ``"sequence"`` (GSPO: one ratio per text, the geometric
            mean of its token ratios).
        kl_placement: ``"loss"`` or ``"reward"`` (see above).
        kl_estimator: the per-token KL in the loss: ``"k1"``, ``"k2"`` or ``"k3"`` (only k1 in the reward).
        mask_truncated: leave the texts that hit ``max_new_tokens`` without a stop token out of the loss (TRL's
            ``mask_truncated_completions``, DAPO's overlong filtering); they still count in the group statistics.
        dynamic_sampling: DAPO's dynamic sampling: drop the groups whose scores are all equal (no policy
            gradient) and roll out more groups to refill the batch, up to ``max_sampling_rounds`` rollouts; a
            batch still short is topped up with dropped groups (logged as ``rollout/sampling_shortfall``).
        max_sampling_rounds: rollouts per iteration at most, with ``dynamic_sampling``.
        **kwargs: the shared settings of :class:`~algorithms.common.on_policy.OnPolicyAlgorithm` (except
            those of a critic: ``gamma``, ``gae_lambda``, ``whiten_rewards``, ``normalize_advantage``,
            ``n_steps``, ``reward_clip``).
    """

    def __init__(
        self,
        policy: LMActorCriticPolicy,
        *,
        group_size: int = 4,
        n_epochs: int = 1,
        batch_size: int | None = None,
        micro_batch_size: int = 8,
        eps_low: float = 0.2,
        eps_high: float = 0.2,
        aggregation: str = "grpo",
        importance: str = "token",
        kl_placement: str = "loss",
        kl_estimator: str = "k3",
        mask_truncated: bool = False,
        dynamic_sampling: bool = False,
        max_sampling_rounds: int = 3,
        **kwargs,
    ) -> None:
        name = type(self).__name__
        given = [key for key in CRITIC_SETTINGS if key in kwargs]
        if given:
            raise ValueError(
                f"{', '.join(given)}: not a setting of {name}, which has no critic (no GAE) and trains on whole "
                "texts; leave it out"
            )
        check_arg("group_size", group_size, lambda v: int(v) == v and v >= 1, "an integer >= 1")
        check_arg("n_epochs", n_epochs, lambda v: int(v) == v and v >= 1, "an integer >= 1")
        check_arg(
            "batch_size",
            batch_size,
            lambda v: v is None or (int(v) == v and v >= 1),
            "an integer >= 1 or None",
        )
        check_arg("micro_batch_size", micro_batch_size, lambda v: int(v) == v and v >= 1, "an integer >= 1")
        check_arg("eps_low", eps_low, lambda v: 0 <= v < 1, "in [0, 1)")
        check_arg("eps_high", eps_high, lambda v: 0 <= v < float("inf"), "finite and >= 0")
        check_arg(
            "aggregation",
            aggregation,
            lambda v: v in ("grpo", "dr_grpo", "dapo"),
            "'grpo', 'dr_grpo' or 'dapo'",
        )
        check_arg("importance", importance, lambda v: v in ("token", "sequence"), "'token' or 'sequence'")
        check_arg("kl_placement", kl_placement, lambda v: v in ("loss", "reward"), "'loss' or 'reward'")
        check_arg("kl_estimator", kl_estimator, lambda v: v in ("k1", "k2", "k3"), "'k1', 'k2' or 'k3'")
        check_arg(
            "max_sampling_rounds", max_sampling_rounds, lambda v: int(v) == v and v >= 1, "an integer >= 1"
        )
        if kl_placement == "reward" and kl_estimator != "k1":
            raise ValueError(
                f"kl_estimator={kl_estimator!r} with kl_placement='reward': as a per-token reward only k1 has the "
                "gradient of KL(pi || pi_ref); use kl_estimator='k1', or kl_placement='loss'"
            )
        if dynamic_sampling and group_size < 2:
            raise ValueError(
                "dynamic_sampling drops groups whose scores are all equal: it needs group_size >= 2"
            )
        n_envs = _core_setting(kwargs, "n_envs")
        if n_envs % group_size:
            raise ValueError(
                f"n_envs must be a multiple of group_size ({group_size}): a process holds whole groups; got "
                f"n_envs={n_envs}"
            )
        if policy.critic_trunk is not None:
            raise ValueError(f"separate_critic: {name} has no critic; load the policy without it")
        self.group_size, self.n_epochs = int(group_size), int(n_epochs)
        self.batch_size, self.micro_batch_size = batch_size, int(micro_batch_size)
        self.eps_low, self.eps_high = eps_low, eps_high
        self.aggregation, self.importance = aggregation, importance
        self.kl_placement, self.kl_estimator = kl_placement, kl_estimator
        self.mask_truncated = mask_truncated
        self.dynamic_sampling, self.max_sampling_rounds = dynamic_sampling, int(max_sampling_rounds)
        # beta = 0 for good (no adaptive controller): no reference model anywhere
        self.uses_reference = _core_setting(kwargs, "kl_coef") > 0 or kwargs.get("kl_target") is not None
        self.kl_in_reward = self.uses_reference and kl_placement == "reward"
        self.kl_in_loss = self.uses_reference and kl_placement == "loss"
        reference = kwargs.pop("reference", None)
        if reference is not None and not self.uses_reference:
            raise ValueError("reference: kl_coef=0 without kl_target uses no reference model; pass none")
        if reference is not None and policy.adapter is not None:
            raise ValueError(
                "reference: with LoRA the reference is the model with its adapters off; pass none"
            )
        # the env's reference (a per-token KL in the reward), or the loss's (below)
        super().__init__(policy, reference=reference if self.kl_in_reward else None, **kwargs)
        # the loss's reference: the model with its adapters off (LoRA, None here), or a frozen copy
        self.reference_model = (
            (reference if reference is not None else policy.reference_copy())
            if self.kl_in_loss and policy.adapter is None
            else None
        )
        width = self.envs.single_observation_space.shape[-1]
        rounds = self.max_sampling_rounds if dynamic_sampling else 1
        # one block of n_envs columns per rollout round; each column's first text is a sample
        self.buffer = RolloutBuffer(
            self.n_steps, self.n_envs * rounds, width, self.process_group, kind=policy.kind
        )
        self.rollout: GroupRollout | None = None

    # ------------------------------------------------------------------------------------------ the env
    def _env_reference(self, reference: torch.nn.Module | None) -> tuple[torch.nn.Module, Any]:
        if self.kl_in_reward:
            return self.policy.env_reference(self.n_envs, reference)
        # the env never runs its model without a per-token reference: the policy's stands in (no copy)
        return self.policy.model, None

    def _env_options(self) -> dict[str, Any]:
        return {
            "kl_coef": self.kl_controller.value if self.kl_in_reward else 0.0,
            "autoreset_mode": AutoresetMode.SAME_STEP,
            "group_size": self.group_size,
            "per_token_reference": self.kl_in_reward,
        }

    # ------------------------------------------------------------------------------------------ rollouts
    def _round_seed(self, round_: int) -> int:
        """This process's reset seed for rollout ``round_`` of the iteration (round 0: the core's)."""
        base = self._iteration_seed(self.iteration)
        if round_:
            base = (base + round_ * 104_729 * self.world_size * self.n_envs) % 2**31
        return base + self.rank * self.n_envs

    def _collect_rollouts(self) -> dict[str, Any]:
        beta = self.kl_controller.value
        if self.kl_in_reward:
            self.envs.kl_coef = beta
        n, g = self.n_envs, self.group_size
        start = time.perf_counter()
        rounds: list[dict[str, Any]] = []  # each round's texts, one per row
        for round_ in range(self.max_sampling_rounds if self.dynamic_sampling else 1):
            rounds.append(self._rollout_round(round_, beta))
            varied = sum((~r["constant"]).sum() for r in rounds)
            if varied >= n // g:  # dynamic sampling: the batch is full of groups that carry a gradient
                break
        every = {key: np.concatenate([r[key] for r in rounds]) for key in ("lengths", "scores", "truncated")}
        columns, shortfall = self._select_groups([r["constant"] for r in rounds])
        self.rollout = GroupRollout(
            columns, *(every[key][columns] for key in ("lengths", "scores", "truncated"))
        )

        first = rounds[0]  # the rollout statistics: round 0's texts, an unbiased draw of the policy's
        kls = first["kls"]
        if self.kl_in_loss:
            # one teacher-forced pass of the reference over the texts that train, and round 0's (rollout/kl)
            measured = np.union1d(columns, np.arange(n))
            self._reference_pass(measured, every["lengths"][measured])
            k1 = self.buffer.log_probs[:, :n] - self.buffer.ref_log_probs[:, :n]  # (T, n)
            kls = (k1 * (np.arange(self.n_steps)[:, None] < first["lengths"][None, :])).sum(0)  # (n,)
        elapsed = time.perf_counter() - start
        tokens = sum(r["steps"] for r in rounds) * n
        self.num_timesteps += tokens * self.world_size
        group = self.process_group
        constant = np.concatenate([r["constant"] for r in rounds])
        texts, episodes, zero_groups, groups, short, entropy, tokens_per_s = group.sum(
            [
                n,
                len(every["scores"]),
                constant.sum(),
                len(constant),
                shortfall,
                np.mean([r["entropy"] for r in rounds]),
                tokens / elapsed,
            ]
        )
        stats = {
            "rollout/rm_score": group.mean(first["scores"]),
            "rollout/ep_len": group.mean(first["lengths"]),
            "rollout/entropy": float(entropy / self.world_size),
            "rollout/episodes": int(episodes),
            "rollout/truncated_texts": group.mean(first["truncated"].astype(float)),
            "rollout/sampling_rounds": float(group.mean([len(rounds)])),
            "time/tokens_per_s": float(tokens_per_s),
            "time/rollout_s": elapsed,
        }
        if g > 1:  # (a group of one is trivially constant)
            stats["rollout/frac_zero_std_groups"] = float(zero_groups / groups)
        if self.dynamic_sampling:
            stats["rollout/sampling_shortfall"] = int(short)
        if self.uses_reference:
            stats["rollout/kl"] = group.mean(kls)
        for key, value in stats.items():
            self.logger.record(key, value)
        self._warn_if_constant(list(first["scores"]))
        return {
            "stats": {"rollout/kl": float("nan"), **stats},
            "samples": first["samples"],
            "texts": int(texts),
        }

    def _select_groups(self, constant: list[np.ndarray]) -> tuple[np.ndarray, int]:
        """The buffer columns (n_envs,) of the groups that train, from each round's flags of its groups with
        all-equal scores (n_envs / G,) each: round 0's groups, or with dynamic sampling the others in order,
        topped up with constant ones when there are too few; and how many constant groups topped up."""
        n, g = self.n_envs, self.group_size
        firsts = [
            (r * n + k * g, bool(flat)) for r, flags in enumerate(constant) for k, flat in enumerate(flags)
        ]
        if self.dynamic_sampling:
            varied = [first for first, flat in firsts if not flat][: n // g]
            shortfall = n // g - len(varied)
            kept = varied + [first for first, flat in firsts if flat][:shortfall]
        else:
            kept, shortfall = [first for first, _ in firsts[: n // g]], 0
        return np.array([first + i for first in kept for i in range(g)]), shortfall

    def _rollout_round(self, round_: int, beta: float) -> dict[str, Any]:
        """Roll every row's first text into the buffer's columns of ``round_``; return their statistics."""
        n = self.n_envs
        columns = slice(round_ * n, (round_ + 1) * n)
        agent, obs = self._start_rollout(self._round_seed(round_))
        stops = set(self.envs.stop_token_ids.tolist())
        on_first_text = np.ones(n, dtype=bool)
        lengths = np.zeros(n, dtype=np.int64)
        scores, kls = np.zeros(n), np.zeros(n)
        truncated = np.zeros(n, dtype=bool)
        samples = []
        steps = 0
        for t in range(self.n_steps):
            # the agent's half of the k1 penalty joins the reward only with the KL in the reward
            step, next_obs, dones, infos, k1 = self._rollout_step(
                agent, obs, t, beta if self.kl_in_reward else 0.0, columns
            )
            kls += np.where(on_first_text, k1, 0.0)
            steps = t + 1
            final = infos.get("final_info", {})
            actions = step.actions.tolist()
            for i in np.flatnonzero(dones & on_first_text):
                on_first_text[i] = False
                lengths[i], scores[i] = t + 1, final["score"][i]
                truncated[i] = actions[i] not in stops
                samples.append((final["prompt"][i], final["text"][i], final["score"][i]))
            if not on_first_text.any():
                break
            obs = next_obs
        return {
            "lengths": lengths,
            "scores": scores,
            "constant": zero_std_groups(torch.as_tensor(scores), self.group_size).numpy(),  # (n / G,)
            "kls": kls,
            "truncated": truncated,
            "samples": samples,
            "steps": steps,
            "entropy": agent.mean_entropy,
        }

    @torch.no_grad()
    def _reference_pass(self, columns: np.ndarray, lengths: np.ndarray) -> None:
        """``buffer.ref_log_probs`` at the texts of ``columns``: one teacher-forced pass of the reference."""
        buffer, policy = self.buffer, self.policy
        if buffer.ref_log_probs is None:
            buffer.ref_log_probs = np.zeros_like(buffer.log_probs)
        segments = _first_texts(columns, lengths)
        for start in range(0, len(segments), self.micro_batch_size):
            chunk = segments[start : start + self.micro_batch_size]
            batch = buffer.batch(chunk, policy.device, policy.tokenizer.pad_token_id)
            ref = policy.reference_log_probs(batch, self.reference_model).double().cpu().numpy()  # (M,)
            offset = 0
            for column, first, last in chunk:
                buffer.ref_log_probs[first : last + 1, column] = ref[offset : offset + last - first + 1]
                offset += last - first + 1

    # ------------------------------------------------------------------------------------------ learning
    def advantages(self, batch: GroupBatch) -> torch.Tensor:
        """The algorithm's estimator: (B,) one advantage per text, or (B, T) one per token."""
        raise NotImplementedError

    def group_batch(self) -> GroupBatch:
        """The rollout's texts as the estimator's tensors."""
        rollout, buffer = self.rollout, self.buffer
        steps = np.arange(int(rollout.lengths.max()))  # (T,)
        mask = steps[None, :] < rollout.lengths[:, None]  # (B, T)
        token_rewards = np.where(
            mask, buffer.rewards[steps[None, :], rollout.columns[:, None]], 0.0
        )  # (B, T)
        as_tensor = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
        return GroupBatch(
            scores=as_tensor(rollout.scores),
            rewards=as_tensor(token_rewards.sum(-1)),
            token_rewards=as_tensor(token_rewards),
            mask=as_tensor(mask),
            group_size=self.group_size,
        )

    def train(self) -> None:
        rollout, buffer = self.rollout, self.buffer
        batch = self.group_batch()
        advantages = self.advantages(batch).double().numpy()  # (B,) or (B, T)
        per_text = advantages.ndim == 1
        for i, (column, length) in enumerate(zip(rollout.columns, rollout.lengths)):
            buffer.advantages[:length, column] = advantages[i] if per_text else advantages[i, :length]
        segments = _first_texts(rollout.columns, rollout.lengths)
        trains = ~rollout.truncated if self.mask_truncated else np.ones(len(segments), dtype=bool)
        beta = self.kl_controller.value if self.kl_in_loss else 0.0
        rng = np.random.default_rng(self._iteration_seed(self.iteration))
        stats: dict[str, list[float]] = {}
        for _epoch in range(self.n_epochs):
            for chunk in buffer.chunks(len(segments), self.batch_size or len(segments), rng):
                # the counts the step's loss divides by, over every process (policy_loss's num_*)
                n_texts, n_tokens = self.process_group.sum(
                    [len(chunk), float((rollout.lengths[chunk] * trains[chunk]).sum())]
                )
                counts = {
                    "num_sequences": n_texts / self.world_size,
                    "num_tokens": max(n_tokens, 1.0) / self.world_size,
                }
                self.zero_grad()
                finite, step_loss = True, 0.0
                for start in range(0, len(chunk), self.micro_batch_size):
                    micro = chunk[start : start + self.micro_batch_size]
                    loss, micro_stats = self._loss(
                        [segments[i] for i in micro], trains[micro], per_text, beta, counts
                    )
                    if not torch.isfinite(loss):
                        finite = False
                        break
                    loss.backward()
                    step_loss += micro_stats.pop("pg_loss")  # the step's loss is the sum of its terms
                    for key, value in micro_stats.items():
                        stats.setdefault(key, []).append(value)
                stats.setdefault("pg_loss", []).append(step_loss)
                self.step_optimizer(finite)

        log = self.logger.record
        names = {"pg_loss": "policy_loss", "kl": "kl_loss"}
        for key, values in stats.items():
            log(f"train/{names.get(key, key)}", float(np.mean(values)))
        log("train/skipped_updates", self._skipped_updates)

    def _loss(
        self,
        segments: list[tuple[int, int, int]],
        trains: np.ndarray,
        per_text: bool,
        beta: float,
        counts: dict[str, float],
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of one micro-batch of texts (a term of its step's aggregate) and its statistics."""
        policy = self.policy
        batch = self.buffer.batch(segments, policy.device, policy.tokenizer.pad_token_id)
        log_prob, entropy, _ = policy.evaluate_actions(batch, entropy_grad=False)  # (M,)
        lengths = torch.as_tensor([last - first + 1 for _, first, last in segments], device=log_prob.device)
        valid = torch.arange(int(lengths.max()), device=log_prob.device)[None, :] < lengths[:, None]  # (B, T)
        pad = lambda x: torch.zeros(valid.shape, dtype=x.dtype, device=x.device).masked_scatter(valid, x)  # noqa: E731
        log_prob_bt, old_bt = pad(log_prob), pad(batch.old_log_prob)  # (B, T)
        advantages = pad(batch.advantages)  # (B, T)
        if per_text:
            advantages = advantages[:, 0]  # (B,)
        mask = valid & torch.as_tensor(trains, device=valid.device)[:, None]  # (B, T)
        kl = kl_penalty(log_prob_bt, pad(batch.ref_log_prob), self.kl_estimator) if beta > 0 else None
        loss, stats = policy_loss(
            log_prob_bt,
            old_bt,
            advantages,
            mask,
            aggregation=self.aggregation,
            eps_low=self.eps_low,
            eps_high=self.eps_high,
            importance=self.importance,
            max_tokens=self.n_steps,
            kl=kl,
            beta=beta,
            **counts,
        )
        stats["entropy"] = float(entropy.mean())
        return loss, stats
