"""The shared on-policy core: rollouts through TextGen-v1, the learn loop, logging and checkpoints.

An algorithm subclasses :class:`OnPolicyAlgorithm` and writes only :meth:`~OnPolicyAlgorithm.train`
(stable-baselines3's layout). Everything that is the same for PPO, A2C, TRPO and NLPO lives here.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from gymnasium.vector import AutoresetMode

from algorithms.common.buffer import RolloutBuffer
from algorithms.common.checkpoints import latest_checkpoint, write_folder
from algorithms.common.distributed import ProcessGroup
from algorithms.common.logger import Logger
from algorithms.common.nonfinite import NonFiniteGuard, NonFiniteLossError, check_finite
from algorithms.common.precision import check_trainable_dtype
from algorithms.common.trainer import LR_SCHEDULES, Trainer, check_arg
from algorithms.policy import LMActorCriticPolicy, RolloutAgent
from lm_gym.decoding import torch_threads
from lm_gym.env import TextGenVectorEnv
from lm_gym.kl import AdaptiveKLController, FixedKLController
from lm_gym.rewards import RewardFunction
from lm_gym.tasks import Task
from lm_gym.vector_env import step_values

__all__ = ["AgentStep", "NonFiniteLossError", "OnPolicyAlgorithm"]

POLICY_FILE = "policy.safetensors"  # a checkpoint's trainable weights (their float32 master values)

# Metrics the core computes over every data-parallel process (the same in each); the others are averaged.
GLOBAL_METRICS = frozenset(
    {
        "rollout/rm_score",
        "rollout/kl",
        "rollout/ep_len",
        "rollout/entropy",
        "rollout/episodes",
        "rollout/unfinished_texts",
        "rollout/truncated_texts",
        "rollout/frac_zero_std_groups",
        "rollout/sampling_rounds",
        "rollout/sampling_shortfall",
        "time/tokens_per_s",
        "train/kl_coef",
        "train/learning_rate",
        "time/total_timesteps",
    }
)


class AgentStep(NamedTuple):
    """The agent's move at one rollout step (see :meth:`OnPolicyAlgorithm._act`)."""

    actions: torch.Tensor  # (N,)
    log_probs: torch.Tensor  # (N,) under the law the actions were sampled from: stored for the ratio
    values: torch.Tensor  # (N,)
    kl_log_probs: torch.Tensor  # (N,) what the env's KL penalty compares with the reference's
    action_masks: torch.Tensor | None = None  # (N, V) bool, the tokens the actions were allowed among


class OnPolicyAlgorithm:
    """Collects rollouts of ``n_envs`` TextGen environments and calls the subclass's ``train()``.

    Each iteration resets the environments with a seed derived from ``(seed, iteration)`` and runs
    ``n_steps`` steps (default ``max_new_tokens``: about one text per env). Episodes that end early restart
    in the same step (same-step autoreset); one still running at the last step is bootstrapped with its
    value. Because every iteration is seeded on its own, a run resumed from a checkpoint continues exactly
    as the uninterrupted run would (on CPU).

    **Rollout statistics.** ``rollout/kl``, ``rollout/rm_score`` and ``rollout/ep_len`` are means over the
    *first text of each env*: every env starts the iteration on a fresh prompt, so its first text is one
    draw of a text per prompt, whatever its length. The later texts of an env that stopped early still
    train (they are in the buffer) and count in ``rollout/episodes`` (every finished text), but not in
    these means, where short texts would count several times and bias the KL low. The adaptive KL
    controller steers on ``rollout/kl`` and is stepped by the number of these texts over all processes
    (``n_envs * world_size``), as TRL steps it by its batch size.

    **Data parallel.** Under ``accelerate launch`` or ``torchrun`` every process runs this same loop with
    ``n_envs`` environments of its own (so a rollout has ``n_envs * world_size`` texts) and its own seed
    stream (its envs are rows ``rank * n_envs ...`` of one global batch). What is whitened (advantages,
    rewards) uses the mean and std of all processes; the rollout metrics are global and the others
    averaged; gradients are averaged before clipping (:meth:`step_optimizer`), so every process takes the
    same step and keeps the same weights. Only the main process writes logs, samples, checkpoints and the
    exported model; a resumed run restores the same weights everywhere and each process's RNG state. An
    algorithm that computes gradients outside :meth:`step_optimizer` (TRPO's flat gradient and
    Hessian-vector products, line-search surrogates and KLs) averages them with :meth:`all_reduce_mean`,
    a no-op in a single process; anything that decides control flow (an early stop) must be decided on
    such averaged values, so that every process runs the same collectives.

    **Precision.** The policy computes in its weights' dtype (load it with ``dtype=torch.bfloat16`` for
    bf16); log-probs, entropies, values, losses and the KL are float32. Low-precision trainable weights are
    stepped through float32 master copies (:mod:`algorithms.common.precision`); float16 is refused.

    Args:
        policy: the actor-critic to train.
        task: a task name or :class:`~lm_gym.tasks.Task` (prompts, and the reward when ``reward`` is None).
        reward: a reward function or reward-model name/folder (default: the task's).
        prompts: prompts to use instead of the task's training split.
        n_envs: environments stepped together (texts per rollout), per process when data parallel.
        max_new_tokens: episode length limit.
        max_prompt_tokens: prompts are cut to their last tokens beyond this.
        n_steps: steps per rollout (default ``max_new_tokens``, so that every env's first text finishes).
            With fewer, a first text may be cut: it counts in ``rollout/kl`` and ``rollout/ep_len`` over the
            tokens generated so far, not in ``rollout/rm_score`` (it has no score), and is counted in
            ``rollout/unfinished_texts``.
        learning_rate: AdamW learning rate.
        lr_schedule: ``"constant"`` or ``"linear"`` (decays to 0 at the last iteration of ``learn``).
        gamma: discount (1.0 as in TRL: the score comes at the end, nothing should shrink it).
        gae_lambda: GAE lambda (0.95, TRL and SB3).
        kl_coef: initial KL coefficient beta.
        kl_target: if set, an adaptive controller steers beta so that ``rollout/kl``, the KL per text, tracks
            it (Ziegler et al. 2019); else beta stays fixed.
        kl_horizon: the adaptive controller's horizon, in texts (10,000 as in TRL's old default).
        whiten_rewards: divide the per-token rewards of each rollout by their std before GAE, without
            shifting their mean: a token with no reward keeps none, so a text's return does not depend on its
            length.
        reward_clip: clip per-token rewards to ``[-reward_clip, reward_clip]`` (None = off).
        normalize_advantage: whiten advantages over each rollout (TRL, SB3).
        max_grad_norm: gradient-norm clip (0.5, SB3).
        seed: seeds everything.
        run_dir: TensorBoard logs, ``metrics.jsonl``, ``samples.md``, checkpoints and the exported model.
        checkpoint_every: iterations between checkpoints (and one at the end).
        keep_checkpoints: how many of the latest checkpoints to keep (None = all).
        sample_every: iterations between tables of sample generations.
        max_nonfinite: consecutive iterations with a skipped non-finite update before the run stops with an
            error (after a checkpoint of the last finite weights, with a ``run_dir``).
        verbose: 1 prints a metrics table per iteration.
        stop_token_ids: tokens that end an episode (default EOS).
        reference: the frozen model of the KL penalty (full fine-tuning); default a copy of the policy as it
            is now. Iterated RLHF passes the initial model, so every round is held to the same anchor.
    """

    def __init__(
        self,
        policy: LMActorCriticPolicy,
        *,
        task: str | Task = "sentiment",
        reward: str | RewardFunction | Callable | None = None,
        prompts: Sequence[str] | None = None,
        n_envs: int = 16,
        max_new_tokens: int = 48,
        max_prompt_tokens: int = 64,
        n_steps: int | None = None,
        learning_rate: float = 1e-5,
        lr_schedule: str = "constant",
        gamma: float = 1.0,
        gae_lambda: float = 0.95,
        kl_coef: float = 0.05,
        kl_target: float | None = None,
        kl_horizon: int = 10_000,
        whiten_rewards: bool = False,
        reward_clip: float | None = None,
        normalize_advantage: bool = True,
        max_grad_norm: float = 0.5,
        seed: int = 0,
        run_dir: str | Path | None = None,
        checkpoint_every: int = 10,
        keep_checkpoints: int | None = 2,
        sample_every: int = 5,
        max_nonfinite: int = 3,
        verbose: int = 1,
        stop_token_ids: Sequence[int] | None = None,
        reference: torch.nn.Module | None = None,
    ) -> None:
        check_arg("learning_rate", learning_rate, lambda v: v > 0, "> 0")
        check_arg("gamma", gamma, lambda v: 0 <= v <= 1, "in [0, 1]")
        check_arg("gae_lambda", gae_lambda, lambda v: 0 <= v <= 1, "in [0, 1]")
        check_arg("max_grad_norm", max_grad_norm, lambda v: v > 0, "> 0")
        check_arg("n_envs", n_envs, lambda v: int(v) == v and v >= 1, "an integer >= 1")
        check_arg("checkpoint_every", checkpoint_every, lambda v: int(v) == v and v >= 1, "an integer >= 1")
        check_arg(
            "keep_checkpoints",
            keep_checkpoints,
            lambda v: v is None or (int(v) == v and v >= 1),
            ">= 1 or None",
        )
        check_arg("max_nonfinite", max_nonfinite, lambda v: isinstance(v, int) and v >= 1, "an integer >= 1")
        self.max_nonfinite = max_nonfinite
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be 'constant' or 'linear'; got {lr_schedule!r}")
        if reward_clip is not None and not reward_clip > 0:
            raise ValueError(f"reward_clip must be > 0 or None; got {reward_clip}")
        check_trainable_dtype(policy)
        self.policy = policy
        self.process_group = ProcessGroup(policy.device)
        self.n_envs = n_envs
        self.n_steps = n_steps or max_new_tokens
        check_arg("n_steps", self.n_steps, lambda v: int(v) == v and v >= 1, "an integer >= 1")
        self.learning_rate, self.lr_schedule = learning_rate, lr_schedule
        self.gamma, self.gae_lambda = gamma, gae_lambda
        self.whiten_rewards, self.reward_clip = whiten_rewards, reward_clip
        self.normalize_advantage, self.max_grad_norm = normalize_advantage, max_grad_norm
        self.seed = seed
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.checkpoint_every, self.sample_every = checkpoint_every, sample_every
        self.keep_checkpoints = keep_checkpoints
        self.kl_controller = (
            AdaptiveKLController(kl_coef, kl_target, kl_horizon)
            if kl_target is not None
            else FixedKLController(kl_coef)
        )
        torch.manual_seed(seed)
        trainable = [p for p in policy.parameters() if p.requires_grad]
        self.process_group.broadcast_parameters(trainable)  # the same starting weights in every process
        # The reference: the policy with its adapters off (LoRA), or a frozen copy of it now. With LoRA, the
        # env's reference rows and the agent's rows run as one pass (algorithms.shared_pass), which the env
        # takes as its reference_decoder and the agent reads.
        reference, self.shared_pass = self._env_reference(reference)
        self.envs = TextGenVectorEnv(
            n_envs,
            model=reference,
            tokenizer=policy.tokenizer,
            task=task,
            reward=reward,
            prompts=prompts,
            max_new_tokens=max_new_tokens,
            max_prompt_tokens=max_prompt_tokens,
            temperature=policy.temperature,
            stop_token_ids=stop_token_ids,
            reference_decoder=self.shared_pass,
            info_text=True,  # the samples logged
            device=policy.device,  # for a reward model given by name
            dtype=policy.dtype,
            **self._env_options(),
        )
        # the HF arrays' width (an encoder-decoder's observation (2, W): its source and its decoder's, each W)
        width = self.envs.single_observation_space.shape[-1]
        self.buffer = RolloutBuffer(self.n_steps, n_envs, width, self.process_group, kind=policy.kind)
        self.trainer = self.make_trainer(trainable)
        main = self.process_group.is_main_process
        self.logger = Logger(self.run_dir if main else None, verbose if main else 0)
        self.iteration = 0
        self.num_timesteps = 0
        self._skipped_updates = 0  # this iteration's, counted by apply_gradients / step_optimizer

    def _env_reference(self, reference: torch.nn.Module | None) -> tuple[torch.nn.Module, Any]:
        """The env's ``(model, reference_decoder)``: the reference of its per-token KL penalty
        (:meth:`~algorithms.policy.LMActorCriticPolicy.env_reference`). Called once, by ``__init__``."""
        return self.policy.env_reference(self.n_envs, reference)

    def _env_options(self) -> dict[str, Any]:
        """The env's settings that an algorithm family chooses (the critic-free methods: groups, no per-token
        reference). Called once, by ``__init__``."""
        return {"kl_coef": self.kl_controller.value, "autoreset_mode": AutoresetMode.SAME_STEP}

    # ------------------------------------------------------------------------------------------ processes
    @property
    def rank(self) -> int:
        """This process's index among the data-parallel processes (0 alone)."""
        return self.process_group.rank

    @property
    def world_size(self) -> int:
        """The number of data-parallel processes (1 alone)."""
        return self.process_group.world_size

    @property
    def is_main_process(self) -> bool:
        """True in the process that writes logs, checkpoints and the exported model."""
        return self.process_group.is_main_process

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean over the data-parallel processes of a float tensor of the same shape in each, written in
        place and returned; the tensor as it is in a single process. Every process must call it at the same
        point (it is a collective)."""
        return self.process_group.all_reduce_mean(tensor)

    # ------------------------------------------------------------------------------------------ rollouts
    def _iteration_seed(self, iteration: int) -> int:
        """The iteration's seed, the same in every process (minibatch order, TRPO's solver)."""
        return (self.seed * 1_000_003 + iteration * 7919) % 2**31

    def collect_rollouts(self) -> dict[str, Any]:
        """Fill the buffer with ``n_steps`` steps of every env; compute advantages and returns."""
        # share the cores with the env's background reference thread, if it has one
        busy = self.envs.reference_threads
        with torch_threads(max(1, torch.get_num_threads() - busy) if busy else None):
            return self._collect_rollouts()

    def _hf(self, obs: np.ndarray) -> dict[str, np.ndarray]:
        """The env's observations (N, L) (encoder-decoder: (N, 2, W)) in the HF layout of the policy."""
        return self.policy.kind.hf_inputs(obs, self.policy.tokenizer.pad_token_id)

    def _collect_rollouts(self) -> dict[str, Any]:
        # this process's envs are rows rank * n_envs ... of one global batch: prompts and samples of their own
        seed = self._iteration_seed(self.iteration) + self.rank * self.n_envs
        beta = self.envs.kl_coef = self.kl_controller.value
        start = time.perf_counter()
        agent, obs = self._start_rollout(seed)
        episode_kl, episode_len = np.zeros(self.n_envs), np.zeros(self.n_envs, dtype=np.int64)
        on_first_text = np.ones(self.n_envs, dtype=bool)  # rows whose first text has not ended yet
        scores, kls, lengths, samples = [], [], [], []  # scores, KLs and lengths of the first texts
        for t in range(self.n_steps):
            _, next_obs, dones, infos, k1 = self._rollout_step(agent, obs, t, beta)
            # every row took a step (SAME_STEP autoreset: no row idles on a reset step)
            episode_kl += k1
            episode_len += 1
            final = infos.get("final_info", {})
            for i in np.flatnonzero(dones):
                if on_first_text[i]:
                    scores.append(final["score"][i])
                    kls.append(episode_kl[i])
                    lengths.append(episode_len[i])
                    on_first_text[i] = False
                samples.append((final["prompt"][i], final["text"][i], final["score"][i]))
                episode_kl[i], episode_len[i] = 0.0, 0
            obs = next_obs
        # first texts cut by the rollout's end (n_steps < max_new_tokens): their KL and length so far
        kls.extend(episode_kl[on_first_text])
        lengths.extend(episode_len[on_first_text])
        last_values = agent.value(obs)
        elapsed = time.perf_counter() - start
        rewards = self.buffer.rewards
        if self.reward_clip is not None:
            np.clip(rewards, -self.reward_clip, self.reward_clip, out=rewards)
        group = self.process_group
        if self.whiten_rewards:
            # by the std alone: a shifted mean would reward every token, so returns would depend on length
            _, std = group.mean_std(rewards)
            rewards /= std + 1e-8
        self.buffer.compute_returns_and_advantage(last_values, self.gamma, self.gae_lambda)
        tokens = self.n_steps * self.n_envs
        self.num_timesteps += tokens * self.world_size
        # over every process (the same in each: the KL controller steers on rollout/kl)
        texts, unfinished, episodes, entropy, tokens_per_s = group.sum(
            [len(kls), on_first_text.sum(), len(samples), agent.mean_entropy, tokens / elapsed]
        )
        stats = {
            "rollout/rm_score": group.mean(scores),
            "rollout/kl": group.mean(kls),
            "rollout/ep_len": group.mean(lengths),
            "rollout/entropy": float(entropy / self.world_size),
            "rollout/episodes": int(episodes),
            "rollout/unfinished_texts": int(unfinished),
            "time/tokens_per_s": float(tokens_per_s),
            "time/rollout_s": elapsed,
        }
        for key, value in stats.items():
            self.logger.record(key, value)
        self._warn_if_constant([score for _, _, score in samples])
        # texts: the number of texts rollout/kl is over, which steps the adaptive KL controller
        return {"stats": stats, "samples": samples, "texts": int(texts)}

    def _warn_if_constant(self, scores: Sequence[float]) -> None:
        """Warn when every text of the first rollout got one score: nothing to learn from."""
        if self.iteration == 0 and len(scores) > 1 and np.ptp(scores) == 0:
            warnings.warn(
                f"every text of the first rollout scored {scores[0]}: the reward gives this policy nothing to "
                "learn from (e.g. VADER scores the random bytes of the 'tiny' test model 0; its toy task is "
                "task='letters')",
                stacklevel=3,
            )

    def _start_rollout(self, seed: int) -> tuple[RolloutAgent, dict[str, np.ndarray]]:
        """A fresh agent sampling with a generator seeded ``seed``, and the envs reset with ``seed``: their
        observations in HF layout."""
        generator = torch.Generator(device=self.policy.device).manual_seed(seed)
        agent = self.policy.rollout_agent(self.n_envs, generator, self.shared_pass)
        obs, _ = self.envs.reset(seed=seed)
        return agent, self._hf(obs)

    def _rollout_step(
        self,
        agent: RolloutAgent,
        obs: dict[str, np.ndarray],
        t: int,
        beta: float,
        columns: slice = slice(None),
    ) -> tuple[AgentStep, dict[str, np.ndarray], np.ndarray, dict[str, Any], np.ndarray]:
        """One step of every env, stored as step ``t`` in the buffer's ``columns``, its rewards carrying the
        agent's half of a KL penalty of coefficient ``beta`` (0: none).

        Returns:
            the agent's step; the next observations (HF layout); dones (N,); the env's infos; and each row's
            k1 term ``log pi(a_t) - log pi_ref(a_t)`` (N,), ``log pi_ref`` 0 where the env priced none.
        """
        step = self._act(agent, obs)
        next_obs, rewards, terminated, truncated, infos = self.envs.step(step.actions)
        dones = terminated | truncated
        # The env pays beta * log pi_ref(a_t); the agent's half of the k1 penalty is -beta * log pi(a_t),
        # from the log-prob it sampled with: r_t = score - beta * (log pi - log pi_ref), exactly.
        log_pi = step.kl_log_probs.double().cpu().numpy()  # (N,)
        rewards = rewards - beta * log_pi
        self.buffer.add(
            t, obs, step.actions, step.log_probs, step.values, rewards, dones, step.action_masks, columns
        )
        k1 = log_pi - step_values(infos, "ref_log_prob", dones)
        return step, self._hf(next_obs), dones, infos, k1

    def _act(self, agent: RolloutAgent, obs: dict[str, np.ndarray]) -> AgentStep:
        """The agent's move at one rollout step. An algorithm that changes how actions are drawn (NLPO's
        masks) overrides this rather than the rollout loop."""
        actions, log_probs, values = agent.act(obs)
        return AgentStep(actions, log_probs, values, log_probs)

    # ------------------------------------------------------------------------------------------ learning
    def train(self) -> None:
        """One update from the buffer: the only method an algorithm must write."""
        raise NotImplementedError

    def make_trainer(self, params: Sequence[torch.nn.Parameter]) -> Trainer:
        """The trainer skeleton (:class:`~algorithms.common.trainer.Trainer`: AdamW over float32 master copies
        of the low-precision ``params``, finite steps, the non-finite guard, checkpoints). An algorithm that
        steps part of the policy by hand (TRPO's actor) builds the trainer of the rest with this."""
        return Trainer(
            params,
            self.process_group,
            learning_rate=self.learning_rate,
            max_grad_norm=self.max_grad_norm,
            lr_schedule=self.lr_schedule,
            max_nonfinite=self.max_nonfinite,
            unit="iteration",
            hint="check the reward function and the learning rate",
        )

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The trainer's AdamW (over the float32 masters of low-precision parameters)."""
        return self.trainer.optimizer

    @optimizer.setter
    def optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        self.trainer.optimizer = optimizer

    @property
    def nonfinite(self) -> NonFiniteGuard:
        """Counts the iterations in a row that skipped a non-finite update; stops the run."""
        return self.trainer.guard

    def zero_grad(self) -> None:
        """Drop the accumulated gradients (of the parameters and of their master copies)."""
        self.trainer.zero_grad()

    def apply_gradients(self, loss: torch.Tensor) -> bool:
        """Backward, clip, step, unless the loss or the gradient is not finite (then nothing changes)."""
        self.zero_grad()
        finite = bool(torch.isfinite(loss))
        if finite:
            loss.backward()
        elif self.world_size == 1:
            self._skipped_updates += 1
            return False
        return self.step_optimizer(finite)

    def step_optimizer(self, finite: bool = True) -> bool:
        """Average the accumulated gradients over the processes, clip them and step, unless this process's
        loss (``finite=False``) or the averaged gradient's norm is not finite (then nothing changes, in every
        process). Every process must call it the same number of times."""
        if self.trainer.step(finite) is None:
            self._skipped_updates += 1
            return False
        return True

    def learn(self, iterations: int, progress_bar: bool = False, export: bool = True) -> OnPolicyAlgorithm:
        """Run until ``iterations`` iterations in total are done (a resumed run continues its count); then,
        with ``export`` and a ``run_dir``, write the policy to ``run_dir/final`` (``save_pretrained``).

        Raises:
            NonFiniteLossError: ``max_nonfinite`` consecutive iterations skipped a non-finite update; the
                iteration is logged and, with a ``run_dir``, checkpointed (the last finite weights) first.
        """
        bar = None
        if progress_bar and self.is_main_process:
            from tqdm.auto import tqdm

            bar = tqdm(total=iterations, initial=self.iteration, desc="lm-gym", unit="it")
        while self.iteration < iterations:
            learning_rate = self.trainer.set_learning_rate(self.iteration, iterations)
            rollout = self.collect_rollouts()
            _release_free_memory()  # before the update's peak: the rollout's freed buffers back to the OS
            self._skipped_updates = 0
            start = time.perf_counter()
            self.train()
            self.logger.record("time/train_s", time.perf_counter() - start)
            stop = self.nonfinite.end_round(self._skipped_updates, f"iteration {self.iteration}")
            kl = rollout["stats"]["rollout/kl"]
            if np.isfinite(kl):  # per text, and stepped by texts: Ziegler et al. 2019, section 2.2; TRL
                self.kl_controller.update(kl, n_samples=rollout["texts"])
            self.logger.record("train/kl_coef", self.kl_controller.value)
            self.logger.record("train/learning_rate", learning_rate)
            self.logger.record("time/total_timesteps", self.num_timesteps)
            self._average_metrics()
            self.iteration += 1
            if self.sample_every and self.iteration % self.sample_every == 0:
                self._log_samples(rollout["samples"])
            self.logger.dump(self.iteration)
            checkpoint = None
            if self.run_dir is not None and (
                stop or self.iteration % self.checkpoint_every == 0 or self.iteration == iterations
            ):
                checkpoint = self.save_checkpoint()
            if stop:
                kept = "the weights hold the last finite update"
                if checkpoint is not None:
                    kept += f", and so does the checkpoint {checkpoint}"
                if bar is not None:
                    bar.close()
                raise self.nonfinite.error(kept)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        if export and self.run_dir is not None and self.is_main_process:
            check_finite(self.policy.named_parameters(), f"model {self.run_dir / 'final'}")
            write_folder(self.run_dir / "final", self.policy.save_pretrained)
        self.process_group.barrier()  # every process returns with the run directory complete
        return self

    def _average_metrics(self) -> None:
        """Replace this process's own metrics (losses, timings, an algorithm's extras) by their mean over
        the processes; the core's rollout statistics and counters are global already."""
        local = {k: v for k, v in self.logger.values.items() if k not in GLOBAL_METRICS}
        self.logger.values.update(self.process_group.mean_of_finite(local))

    def _log_samples(self, samples: list[tuple[str, str, float]]) -> None:
        rows = ["| prompt | completion | score |", "|---|---|---|"]
        for prompt, text, score in samples[:6]:
            clean = lambda s: s.replace("|", "\\|").replace("\n", " ")  # noqa: E731
            rows.append(f"| {clean(prompt)} | {clean(text)} | {score:+.3f} |")
        self.logger.text("samples", "\n".join(rows), self.iteration)

    # ------------------------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        """Write weights (safetensors), optimizer, KL controller and counters atomically; return the folder.
        Weights that hold NaN or inf are refused (``ValueError``): the earlier checkpoints stay as they are."""
        trainable = {key: p for key, p in self.policy.named_parameters() if p.requires_grad}
        state = {
            "iteration": self.iteration,
            "num_timesteps": self.num_timesteps,
            "kl_controller": self.kl_controller.state_dict(),
        }
        name = f"iter_{self.iteration:06d}"
        return self.trainer.save(
            self.run_dir / "checkpoints",
            name,
            trainable,
            state,
            self.keep_checkpoints,
            weights_file=POLICY_FILE,
            write_extra=self._save_extra_state,
        )

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore a checkpoint folder, or the latest intact one of a run directory, to continue with ``learn``;
        what the run logged after that checkpoint is dropped from its logs at the next write."""
        path = Path(path)
        path = latest_checkpoint(path / "checkpoints") or path
        if not (path / POLICY_FILE).exists():
            raise FileNotFoundError(
                f"no checkpoint at {path} (expected {POLICY_FILE}, optimizer.pt, state.json)"
            )
        trainable = {key: p for key, p in self.policy.named_parameters() if p.requires_grad}
        state = self.trainer.load(path, trainable, POLICY_FILE, "policy (LoRA vs full, or another model)")
        self.iteration, self.num_timesteps = state["iteration"], state["num_timesteps"]
        self.kl_controller.load_state_dict(state["kl_controller"])
        self.logger.resume(self.iteration)
        self._load_extra_state(path)

    def _save_extra_state(self, folder: Path) -> None:
        """Write an algorithm's own state (beyond weights, optimizer and counters) into a checkpoint folder
        being staged; the default has none. Needed only for what a resumed run cannot rebuild."""

    def _load_extra_state(self, folder: Path) -> None:
        """Restore what :meth:`_save_extra_state` wrote into the checkpoint ``folder``."""

    def close(self) -> None:
        self.envs.close()
        self.logger.close()


def _release_free_memory() -> None:
    """Return the C heap's free memory to the OS (glibc's ``malloc_trim``; elsewhere nothing). Freed KV
    caches of the rollout, some in the reference thread's own heap, would otherwise sit under the update's
    allocations and raise the peak."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            import ctypes

            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM: Any = None
