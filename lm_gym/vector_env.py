"""``TextGenVectorEnv``: N ``TextGen-v1`` environments stepped together, the engine of both envs."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Literal

import gymnasium as gym
import numpy as np
import torch
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.tokenization_utils_base import VERY_LARGE_INTEGER

from lm_gym.decoding import RowDecoder, torch_threads
from lm_gym.kinds import load_lm, model_kind
from lm_gym.rewards import RewardFunction, as_text_list, checked_scores, make_reward
from lm_gym.spaces import pack_observation
from lm_gym.tasks import Task, get_task

__all__ = ["ASYNC_MIN_PARAMETERS", "DEFAULT_MODEL", "TextGenVectorEnv", "step_values"]

DEFAULT_MODEL = "smollm2-135m"

# From this many reference parameters on, a forward pass is mostly matrix kernels (which release the GIL),
# so running it in a background thread overlaps with the agent's own pass (async_reference's default).
ASYNC_MIN_PARAMETERS = 20_000_000


class TextGenVectorEnv(VectorEnv):
    """N ``TextGen-v1`` environments stepped together: one batched reference forward per step.

    Same reward, observations and info as :class:`lm_gym.env.TextGenEnv` (see its docstring for the semantics and the
    arguments); seeded with ``reset(seed=s)``, row ``i`` is the single env seeded with ``s + i``. Rows that
    end restart on a new prompt following ``autoreset_mode``; only the new prompts are prefilled, the other
    rows' caches are kept (see :mod:`lm_gym.decoding`).

    The default is ``SAME_STEP`` (a row that ends restarts within the same ``step``; its last observation and
    info are in ``info["final_obs"]`` / ``info["final_info"]``): every step of every row is then a step of an
    episode, as stable-baselines3's VecEnvs and CleanRL-style loops expect, and TorchRL's ``GymWrapper``
    accepts it (it refuses ``NEXT_STEP``). ``NEXT_STEP`` (Gymnasium's own vector envs' default: a row spends
    one ``step`` restarting, its action ignored, its reward 0) and ``DISABLED`` (rows restart only through
    ``reset(options={"reset_mask": ...})``) are there too.

    **Groups** (``group_size=G``, for the critic-free group methods: GRPO, RLOO, ...): at ``reset`` the G
    consecutive rows of each block (0..G-1, G..2G-1, ...) start from one prompt, drawn by the generator of the
    block's first reset row (seeded ``s + i`` as above), so the prompts are the seed's and a group method can
    compare one prompt's G completions. Groups are formed at ``reset`` only: a row that autoresets mid-rollout
    draws its own prompt with its own generator and is a group of one, under a new id. A group method keeps each
    row's first text after a ``reset`` and drops what a row generates after it restarts (the critic-free core
    of ``algorithms/`` does, with ``SAME_STEP``; under ``DISABLED`` an ended row cannot be stepped before its
    reset, and a batch's rows end at different steps). ``info["group"]`` (with
    ``G > 1``; int64, on every row at every step, like ``prompt_truncated``) is the id of the prompt draw the
    row's current text belongs to: the same for the rows of a group, new at every draw (ids count up over the
    env's life, unique within one env). With ``options={"prompts": [...]}`` each distinct prompt among a
    block's reset rows is one draw (pass a prompt G times to group it). ``G = 1`` (default) changes nothing:
    each row draws its own prompt and there is no ``group`` key.

    Args:
        num_envs: N, the number of rows.
        max_episode_steps: a time limit (``gym.make_vec(..., max_episode_steps=k)``): below
            ``max_new_tokens`` it is the texts' length limit, so every text is scored (see Episode End).
        autoreset_mode: an ``AutoresetMode`` (or its value string); default ``SAME_STEP``.
        group_size: G, the rows that start from one prompt at ``reset`` (see Groups); ``num_envs`` must be a
            multiple of it. Default 1.
        **kwargs: the arguments of :class:`lm_gym.env.TextGenEnv`.
    """

    metadata = {"render_modes": ["ansi"], "autoreset_mode": AutoresetMode.SAME_STEP}

    def __init__(
        self,
        num_envs: int = 1,
        *,
        model: str | PreTrainedModel = DEFAULT_MODEL,
        tokenizer: PreTrainedTokenizerBase | None = None,
        reward: str | RewardFunction | Callable | None = None,
        task: str | Task = "sentiment",
        prompts: Sequence[str] | None = None,
        split: str = "train",
        kl_coef: float = 0.05,
        kl_estimator: Literal["k1"] = "k1",
        max_new_tokens: int = 48,
        max_episode_steps: int | None = None,
        max_prompt_tokens: int = 64,
        temperature: float = 1.0,
        stop_token_ids: Sequence[int] | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        trust_remote_code: bool = False,
        reference_decoder: RowDecoder | None = None,
        info_text: bool = False,
        async_reference: bool | None = None,
        reference_threads: int | None = None,
        autoreset_mode: AutoresetMode | str = AutoresetMode.SAME_STEP,
        group_size: int = 1,
        per_token_reference: bool = True,
        render_mode: str | None = None,
    ) -> None:
        _check_positive(
            num_envs=num_envs,
            max_new_tokens=max_new_tokens,
            max_prompt_tokens=max_prompt_tokens,
            group_size=group_size,
        )
        if max_episode_steps is not None:
            _check_positive(max_episode_steps=max_episode_steps)
        if num_envs % group_size:
            raise ValueError(
                f"num_envs must be a multiple of group_size ({group_size}), whose groups are consecutive rows; "
                f"got num_envs={num_envs}"
            )
        self.group_size = int(group_size)
        self.per_token_reference = bool(per_token_reference)
        if not self.per_token_reference and reference_decoder is not None:
            raise ValueError(
                "reference_decoder steps the reference per token, which per_token_reference=False never runs; "
                "pass one or the other"
            )
        if not self.per_token_reference and async_reference:
            raise ValueError(
                "async_reference=True with per_token_reference=False: there is no reference pass to overlap; "
                "leave async_reference unset"
            )
        self.kl_coef = kl_coef
        if kl_estimator != "k1":
            raise ValueError(
                f"kl_estimator must be 'k1'; got {kl_estimator!r}: as a per-token reward only k1 = log pi - "
                "log pi_ref has the policy gradient of KL(pi || pi_ref) (k2 and k3 do not; see lm_gym.kl)"
            )
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0; got {temperature!r}")
        self.autoreset_mode = AutoresetMode(autoreset_mode)
        self.metadata = {**self.metadata, "autoreset_mode": self.autoreset_mode}
        self.render_mode = render_mode
        self.num_envs = num_envs
        self.kl_estimator = kl_estimator
        self.max_new_tokens = max_new_tokens
        self.max_prompt_tokens = max_prompt_tokens
        self.temperature = float(temperature)
        self.info_text = bool(info_text)

        task = get_task(task) if isinstance(task, str) else task
        self.task = task
        prompt_list = as_text_list(prompts, "prompts") if prompts is not None else list(task.prompts(split))
        if not prompt_list:
            raise ValueError(
                "the prompt set is empty; pass a non-empty list as prompts= or another task/split"
            )
        # a reward model named here gets the device and dtype asked of the env
        self.reward_fn: RewardFunction = make_reward(
            reward if reward is not None else task.make_reward(), device=device, dtype=dtype
        )

        if isinstance(model, str):
            self.reference, self.tokenizer = load_lm(
                model, device=device, dtype=dtype, trust_remote_code=trust_remote_code
            )
            self.reference.requires_grad_(False)
        else:
            if tokenizer is None:
                raise ValueError("pass tokenizer= together with a loaded model")
            self.reference, self.tokenizer = model, tokenizer
            if device is not None:
                self.reference.to(device)
        vocab_size = self.reference.get_output_embeddings().weight.shape[0]
        # causal, or an encoder-decoder that reads the prompt as its source and generates with its decoder
        self.kind = model_kind(self.reference)
        self._check_positions()
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        self.pad_token_id = int(pad_id)
        if stop_token_ids is None:
            stop_token_ids = [] if self.tokenizer.eos_token_id is None else [self.tokenizer.eos_token_id]
        bad = [t for t in stop_token_ids if not 0 <= int(t) < vocab_size]
        if bad:
            raise ValueError(f"stop_token_ids must be token ids in [0, {vocab_size}); got {bad}")
        self.stop_token_ids = np.array(sorted(int(t) for t in stop_token_ids), dtype=np.int64)

        self.prompts = prompt_list
        self._prompt_tokens = [self._tokenize(p, i) for i, p in enumerate(prompt_list)]

        self.single_action_space = gym.spaces.Discrete(vocab_size)
        self.single_observation_space = self.kind.observation_space(
            vocab_size, max_prompt_tokens, max_new_tokens
        )
        self.action_space = batch_space(self.single_action_space, num_envs)
        self.observation_space = batch_space(self.single_observation_space, num_envs)

        if reference_decoder is not None:
            self._check_reference_decoder(reference_decoder, num_envs, async_reference)
            self._decoder = reference_decoder
        else:
            self._decoder = self.kind.decoder(self.reference, num_envs, self.pad_token_id)
        if async_reference is None:
            # Overlap pays when a forward pass is mostly matrix kernels (which release the GIL); for a tiny
            # model it is mostly Python, and two threads only contend for the GIL. An injected decoder may
            # compute what its owner needs at once (a shared pass): nothing to overlap.
            n_params = sum(p.numel() for p in self.reference.parameters())
            async_reference = (
                self.per_token_reference and reference_decoder is None and n_params >= ASYNC_MIN_PARAMETERS
            )
        # The torch threads of the background reference (None: it runs in the caller's thread). An agent in
        # the same process should take the rest of the cores meanwhile: oversubscribed OpenMP threads spin
        # against each other (measured slower than running the two forwards one after the other).
        self.reference_threads = (
            (reference_threads or max(1, torch.get_num_threads() // 2)) if async_reference else None
        )
        self._executor: ThreadPoolExecutor | None = None
        self._start_executor()
        self._pending: Future | None = None
        # while the reference thread is idle (scoring the ended rows), the env's own work may use every core
        self._all_threads = torch.get_num_threads() if async_reference else None
        self._rngs = [seeding.np_random()[0] for _ in range(num_envs)]
        self._prompt_text = [""] * num_envs
        self._prompt_len = np.zeros(num_envs, dtype=np.int64)
        self._seq: list[list[int]] = [[] for _ in range(num_envs)]  # prompt + generated tokens, per row
        self._truncated_prompt = np.zeros(num_envs, dtype=bool)
        # the id of the prompt draw each row's text belongs to (info["group"]), and the next id to give
        self._group = np.zeros(num_envs, dtype=np.int64)
        self._next_group = 0
        self._steps = np.zeros(num_envs, dtype=np.int64)
        self._ended = np.zeros(num_envs, dtype=bool)  # the row's episode is over (DISABLED mode)
        self._fresh = np.zeros(num_envs, dtype=bool)  # NEXT_STEP: the row restarts on this step
        # the last observation, in HF layout (never written to afterwards)
        self._obs: dict[str, np.ndarray] = {}
        self._decode = FastDecoder(self.tokenizer, vocab_size)
        self._needs_reset = True
        # a text's length limit: max_new_tokens, or a shorter time limit (make_vec's max_episode_steps; the
        # single env's TimeLimit), so that the text a time limit ends is scored
        self.length_limit = min(max_new_tokens, max_episode_steps or max_new_tokens)
        self.episode_limit = self.length_limit

    def _start_executor(self) -> None:
        if self.reference_threads is not None:
            self._executor = ThreadPoolExecutor(
                1,
                thread_name_prefix="lm-gym-reference",
                initializer=torch.set_num_threads,
                initargs=(self.reference_threads,),
            )

    def __getstate__(self) -> dict[str, Any]:
        """Picklable (deepcopy, spawn-started workers): the background thread is left behind and restarted.
        The reference model must pickle too (a transformers 5 model once called with ``output_hidden_states=True``
        keeps hooks that do not; ``gym.make`` with a model name loads a fresh one)."""
        self._wait()
        return {**self.__dict__, "_executor": None, "_pending": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._start_executor()

    @property
    def kl_coef(self) -> float:
        """``beta`` of the KL penalty (an algorithm's KL controller sets it between rollouts)."""
        return self._kl_coef

    @kl_coef.setter
    def kl_coef(self, value: float) -> None:
        if isinstance(value, (bool, np.bool_)) or not (
            isinstance(value, numbers.Real) and value >= 0 and math.isfinite(value)
        ):
            raise ValueError(f"kl_coef must be a finite number >= 0; got {value!r}")
        if not self.per_token_reference and value != 0:
            raise ValueError(
                f"kl_coef must be 0 with per_token_reference=False (no reference to pay a KL with); got {value!r}"
            )
        self._kl_coef = float(value)

    def _check_reference_decoder(self, decoder: Any, num_envs: int, async_reference: bool | None) -> None:
        """Refuse a ``reference_decoder`` the env cannot step as its reference, with what was wrong."""
        if not isinstance(decoder, RowDecoder):
            raise ValueError(
                "reference_decoder must be a lm_gym.decoding.RowDecoder (a BatchedDecoder, a Seq2SeqDecoder, "
                f"or a subclass such as algorithms.shared_pass.LoRASharedDecoder); got {type(decoder).__name__}"
            )
        if decoder.model is not self.reference:
            raise ValueError(
                f"reference_decoder steps another model ({type(decoder.model).__name__} at "
                f"{id(decoder.model):#x}) than model= ({type(self.reference).__name__} at {id(self.reference):#x}): "
                "pass the model it steps as model="
            )
        if decoder.num_rows != num_envs:
            raise ValueError(
                f"reference_decoder has {decoder.num_rows} rows; the env has num_envs={num_envs}"
            )
        if not self.kind.fits(decoder):
            raise ValueError(
                f"model= is {self.kind.description} LM: reference_decoder must be a "
                f"{self.kind.decoder_class.__name__} (or a subclass); got {type(decoder).__name__}"
            )
        if async_reference:
            raise ValueError(
                "async_reference=True with a reference_decoder: its owner reads the decoder right after step() "
                "(a shared pass), which a background step would leave one token behind; leave async_reference "
                "unset"
            )

    def _check_positions(self) -> None:
        """Refuse observations longer than the model's positions (``config.max_position_embeddings``, which
        GPT-2's ``n_positions`` answers to, else the tokenizer's ``model_max_length`` when it is set)."""
        limit = getattr(self.reference.config, "max_position_embeddings", None)
        source = "config.max_position_embeddings"
        if limit is None and self.tokenizer.model_max_length < VERY_LARGE_INTEGER:
            limit, source = self.tokenizer.model_max_length, "tokenizer.model_max_length"
        if limit is None:
            return
        for what, length in self.kind.position_lengths(self.max_prompt_tokens, self.max_new_tokens):
            if length > limit:
                raise ValueError(
                    f"{what} = {length} exceeds the model's {limit} positions ({source}); "
                    "lower max_prompt_tokens or max_new_tokens"
                )

    # ------------------------------------------------------------------------------------------ prompts
    def _tokenize(self, prompt: str, index: int | None = None) -> tuple[list[int], bool]:
        if not isinstance(prompt, str) or not prompt:
            where = f"prompt {index}" if index is not None else "the prompt"
            raise ValueError(f"{where} must be a non-empty string; got {prompt!r}")
        ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        if not ids:
            raise ValueError(f"prompt {prompt!r} tokenizes to no tokens")
        return ids[-self.max_prompt_tokens :], len(ids) > self.max_prompt_tokens

    def _start_rows(
        self, rows: Sequence[int], prompts: Sequence[str] | None = None, grouped: bool = False
    ) -> None:
        """Pick (or take) prompts for ``rows`` and schedule their prefill.

        One prompt draw per row, or with ``grouped`` (at reset) per group: the rows of a block of
        ``group_size`` consecutive rows that start together share the draw of the block's first such row's
        generator (with ``prompts``, each distinct prompt of a block is one draw). Each draw gets a new id.
        """
        token_lists = []
        draws: dict[Any, tuple[int, str, list[int], bool]] = {}  # key -> (id, text, tokens, cut)
        for k, row in enumerate(rows):
            block = row // self.group_size if grouped else row
            key = block if prompts is None else (block, prompts[k])
            if key not in draws:
                if prompts is not None:
                    text = prompts[k]
                    tokens, cut = self._tokenize(text)
                else:
                    idx = int(self._rngs[row].integers(len(self.prompts)))
                    text, (tokens, cut) = self.prompts[idx], self._prompt_tokens[idx]
                draws[key] = (self._next_group, text, tokens, cut)
                self._next_group += 1
            self._group[row], text, tokens, cut = draws[key]
            self._prompt_text[row] = self.tokenizer.decode(tokens) if cut else text
            self._prompt_len[row] = len(tokens)
            self._seq[row] = list(tokens)
            self._truncated_prompt[row] = cut
            self._steps[row] = 0
            self._ended[row] = False
            token_lists.append(tokens)
        if self.per_token_reference:
            self._submit(self._decoder.reset_rows, list(rows), token_lists)

    # ------------------------------------------------------------------------------------------ reference
    def _submit(self, fn: Callable, *args: Any) -> None:
        if self._executor is None:
            fn(*args)
            return
        previous = self._pending

        def run() -> None:
            if previous is not None:
                previous.result()  # keep order (one worker) and surface its error
            fn(*args)

        self._pending = self._executor.submit(run)

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    # ------------------------------------------------------------------------------------------ API
    def action_masks(self) -> np.ndarray:
        """(N, V) bool: the tokens each row may take next, all of them (for sb3-contrib's ``MaskablePPO`` and
        other action-masking clients; no task of lm-gym restricts its vocabulary)."""
        return np.ones((self.num_envs, self.single_action_space.n), dtype=bool)

    def reset(
        self, *, seed: int | Sequence[int] | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Start every row (or the rows of ``options["reset_mask"]``) on a new prompt.

        Args:
            seed: an int ``s`` seeds row ``i`` with ``s + i``; a list gives one seed per row.
            options: ``{"prompts": [...]}`` to choose the prompts (one per reset row); ``{"reset_mask":
                bool array}`` to reset only some rows (for ``autoreset_mode=DISABLED``).
        """
        options = options or {}
        mask = np.asarray(options.get("reset_mask", np.ones(self.num_envs, dtype=bool)), dtype=bool)
        if mask.shape != (self.num_envs,):
            raise ValueError(f"reset_mask must be a bool array of shape ({self.num_envs},); got {mask.shape}")
        rows = np.flatnonzero(mask).tolist()
        if seed is not None:
            seeds = [seed + i for i in range(self.num_envs)] if isinstance(seed, int) else list(seed)
            if len(seeds) != self.num_envs:
                raise ValueError(f"reset expects one seed per env ({self.num_envs}); got {len(seeds)}")
            for row in rows:
                self._rngs[row] = seeding.np_random(seeds[row])[0]
        prompts = options.get("prompts")
        if prompts is not None:
            prompts = as_text_list(prompts, "options['prompts']")
        if prompts is not None and len(prompts) != len(rows):
            raise ValueError(
                f"options['prompts'] must hold one prompt per reset env ({len(rows)}); got {len(prompts)}"
            )
        self._wait()
        self._start_rows(rows, prompts, grouped=True)
        self._fresh[rows] = False
        self._needs_reset = False
        infos = self._columns_to_infos(self._info_columns(restarted=mask))
        self._obs = self._observe()
        return pack_observation(self._obs), infos

    def step(
        self, actions: np.ndarray | Sequence[int] | torch.Tensor
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        if self._needs_reset:
            raise RuntimeError("call reset() before step()")
        actions = self._check_actions(actions)
        if self.autoreset_mode == AutoresetMode.DISABLED and self._ended.any():
            raise RuntimeError(
                f"step() on envs whose episode ended: {np.flatnonzero(self._ended).tolist()}; "
                "reset them first (reset(options={'reset_mask': mask}))"
            )
        self._wait()
        measured = self.per_token_reference  # else no reference pass: ref_log_prob absent (0.0) everywhere
        if measured:
            logits = self._decoder.logits  # (N, V)
            if self.temperature != 1.0:
                logits = logits / self.temperature
            # log pi_ref(a) = log_softmax(logits)[a]: log_softmax is one kernel, measured faster on CPU than
            # logits[a] - logsumexp(logits), whose max, subtract, exp, sum and log run one by one (V = 257 to
            # 49,152)
            action_ids = torch.from_numpy(actions).to(logits.device)  # (N,)
            ref_lp = torch.log_softmax(logits, dim=-1).gather(1, action_ids[:, None])[:, 0]
            ref_lp = ref_lp.double().cpu().numpy()  # (N,)
        else:
            ref_lp = np.zeros(self.num_envs)  # (N,)

        # NEXT_STEP: a fresh row restarted at the last step; its action is ignored, its reward is 0
        running = ~self._fresh
        # The reference's part of the KL penalty, beta * log pi_ref(a_t|s_t): with the agent's own part,
        # -beta * log pi(a_t|s_t), the penalty is -beta * (log pi - log pi_ref), the k1 estimate (see Rewards).
        rewards = np.where(running, self.kl_coef * ref_lp, 0.0) + 0.0  # + 0.0: no -0.0 when beta = 0

        self._steps[running] += 1
        running_rows = np.flatnonzero(running).tolist()
        action_list = actions.tolist()
        for i in running_rows:
            self._seq[i].append(action_list[i])
        stops = self.stop_token_ids
        # (np.isin costs ~20 us per step, even for an empty list)
        stopped = actions == stops[0] if len(stops) == 1 else np.isin(actions, stops) if len(stops) else False
        # The text is final at a stop token or at its length limit, and scored there: both end the task
        # (terminated). Truncated stays False: a learner that bootstraps on truncation would add gamma * V on
        # top of a score already paid.
        stopped = running & stopped
        terminated = stopped | (running & (self._steps >= self.episode_limit))
        truncated = np.zeros(self.num_envs, dtype=bool)
        ended = terminated
        continuing = running & ~ended
        ended_rows = np.flatnonzero(ended).tolist()

        # Advance the reference on the rows that go on; with async_reference this runs in the background
        # while the reward model scores the ended rows and the agent computes its next action.
        if measured and continuing.any():
            self._submit(self._decoder.append, action_ids, torch.from_numpy(continuing))

        # the texts: every row's for the info (info_text), else only the ended rows' for the reward model
        texts = (
            self._completions(running if self.info_text else ended, stopped)
            if self.info_text or ended_rows
            else None
        )
        scores = np.zeros(self.num_envs)
        if ended_rows:
            # the reference thread is idle unless rows go on: then the scoring may use all the cores
            with torch_threads(self._all_threads if self._pending is None else None):
                got = checked_scores(
                    self.reward_fn, [self._prompt_text[i] for i in ended_rows], [texts[i] for i in ended_rows]
                )
            scores[ended_rows] = got
            rewards[ended_rows] += got

        # NEXT_STEP: the fresh rows' info is their reset info (see _info_columns)
        columns = self._info_columns(
            restarted=~running, ref_log_prob=(ref_lp, running & measured), score=(scores, ended), texts=texts
        )
        self._fresh[:] = False
        obs = self._advance_observation(running, actions)
        extra: dict[str, Any] = {}
        if self.autoreset_mode == AutoresetMode.DISABLED:
            self._ended |= ended
        elif self.autoreset_mode == AutoresetMode.NEXT_STEP:
            if ended_rows:
                self._start_rows(ended_rows)
                self._fresh[ended_rows] = True
        elif ended_rows:  # SAME_STEP: the final observation and info go into the info; the row restarts now
            final_obs = pack_observation(obs)
            extra["final_obs"] = _objects([final_obs[i] if ended[i] else None for i in range(self.num_envs)])
            extra["_final_obs"] = ended.copy()
            extra["final_info"] = self._columns_to_infos([(k, v, m & ended, f) for k, v, m, f in columns])
            extra["_final_info"] = ended.copy()
            self._start_rows(ended_rows)
            obs = {key: value.copy() for key, value in obs.items()}  # the old arrays may be views
            self._write_observation_rows(obs, ended_rows)
            # the restarted rows' info is their reset info
            columns = self._info_columns(
                restarted=ended, ref_log_prob=(ref_lp, continuing & measured), texts=texts
            )
        self._obs = obs
        return (
            pack_observation(obs),
            rewards,
            terminated,
            truncated,
            {**self._columns_to_infos(columns), **extra},
        )

    def render(self) -> tuple[str, ...]:
        """Each row's prompt and completion so far, ``"prompt|completion"``."""
        texts = self._completions(np.ones(self.num_envs, dtype=bool), np.zeros(self.num_envs, dtype=bool))
        return tuple(prompt + "|" + text for prompt, text in zip(self._prompt_text, texts))

    def close(self, **kwargs: Any) -> None:
        if self._executor is not None:
            self._wait()
            self._executor.shutdown(wait=True)
            self._executor = None

    # ------------------------------------------------------------------------------------------ helpers
    def _check_actions(self, actions: np.ndarray | Sequence[int] | torch.Tensor) -> np.ndarray:
        if isinstance(actions, torch.Tensor):
            actions = actions.detach().cpu().numpy()
        actions = np.asarray(actions)
        n, vocab = self.num_envs, self.single_action_space.n
        if actions.shape != (n,):
            raise ValueError(
                f"actions must be an array of {n} token ids, shape ({n},); got shape {actions.shape}"
            )
        if not np.issubdtype(actions.dtype, np.integer):
            raise ValueError(f"actions must be integer token ids in [0, {vocab}); got dtype {actions.dtype}")
        if actions.min() < 0 or actions.max() >= vocab:
            bad = np.flatnonzero((actions < 0) | (actions >= vocab))
            raise ValueError(
                f"actions must be token ids in [0, {vocab}); got {actions[bad].tolist()} at envs {bad.tolist()}"
            )
        return actions.astype(np.int64)

    def _completions(self, rows: np.ndarray, drop_stop: np.ndarray) -> list[str]:
        """The decoded completion of each row in the mask ``rows`` (others: "")."""
        decode, seqs = self._decode, self._seq
        return [
            decode(seqs[i][start : len(seqs[i]) - drop]) if on else ""
            for i, (on, drop, start) in enumerate(
                zip(rows.tolist(), drop_stop.tolist(), self._prompt_len.tolist())
            )
        ]

    def _info_columns(
        self,
        restarted: np.ndarray,
        ref_log_prob: tuple[np.ndarray, np.ndarray] | None = None,
        score: tuple[np.ndarray, np.ndarray] | None = None,
        texts: list[str] | None = None,
    ) -> list[tuple[str, np.ndarray, np.ndarray, Any]]:
        """The info as ``(key, values (N,), present (N,) bool, fill)`` columns (see :meth:`_columns_to_infos`):
        every key at every step, for clients that fix the info's layout from its first step (TorchRL).

        ``restarted`` (N,) marks the rows that start a prompt (at reset, or at an autoreset): their text is
        empty. ``ref_log_prob`` and ``score`` are ``(values, present)``.
        """
        n, nowhere = self.num_envs, np.zeros(self.num_envs, dtype=bool)
        ref_lp, ref_present = ref_log_prob if ref_log_prob is not None else (np.zeros(n), nowhere)
        scores, scored = score if score is not None else (np.zeros(n), nowhere)
        columns = [
            ("ref_log_prob", ref_lp, ref_present, 0.0),
            ("score", scores, scored, 0.0),
            # a property of each row's current episode, so present on every row at every step
            ("prompt_truncated", self._truncated_prompt.copy(), np.ones(n, dtype=bool), False),
        ]
        if self.group_size > 1:  # the prompt draw of each row's current text, likewise on every row
            columns.append(("group", self._group.copy(), np.ones(n, dtype=bool), -1))
        if self.info_text:
            everyone = np.ones(n, dtype=bool)
            text = _objects(texts if texts is not None else [""] * n)
            text[restarted] = ""
            columns += [("prompt", _objects(self._prompt_text), everyone, ""), ("text", text, everyone, "")]
        return columns

    def _columns_to_infos(self, columns: Sequence[tuple[str, np.ndarray, np.ndarray, Any]]) -> dict[str, Any]:
        """``(key, values (N,), present (N,) bool, fill)`` columns -> Gymnasium's vector info layout:
        ``info[key]`` the values where present and ``fill`` elsewhere, ``info["_" + key]`` the mask. Every key
        is there at every step, present somewhere or not."""
        infos: dict[str, Any] = {}
        for key, values, present, fill in columns:
            if present.all():
                array = values  # every column is a new array at each step: nothing to copy
            elif values.dtype == object:
                array = np.full(self.num_envs, fill, dtype=object)
                array[present] = values[present]
            else:
                array = np.where(present, values, np.asarray(fill, dtype=values.dtype))
            infos[key], infos["_" + key] = array, present.copy()
        return infos

    def _advance_observation(self, advanced: np.ndarray, actions: np.ndarray) -> dict[str, np.ndarray]:
        """The observation after a step: the rows of ``advanced`` gained ``actions`` at their text's right end
        (the previous observation shifted left by one column, in new arrays), the other rows are rebuilt."""
        obs = self.kind.advance_observation(self._obs, actions)
        if not advanced.all():
            self._write_observation_rows(obs, np.flatnonzero(~advanced).tolist())
        return obs

    def _write_observation_rows(self, obs: dict[str, np.ndarray], rows: Sequence[int]) -> None:
        """Rewrite ``rows`` of an observation from their token lists, in place."""
        for i in rows:
            self.kind.write_observation_row(
                obs, i, self._seq[i], self._prompt_len[i], self.pad_token_id, self._decoder
            )

    def _observe(self) -> dict[str, np.ndarray]:
        widths = self.kind.observation_widths(self.max_prompt_tokens, self.max_new_tokens)
        obs = {key: np.empty((self.num_envs, width), dtype=np.int64) for key, width in widths.items()}
        self._write_observation_rows(obs, range(self.num_envs))
        return obs


class FastDecoder:
    """``ids -> tokenizer.decode(ids, skip_special_tokens=True)`` for ids in ``[0, vocab_size)``, by the
    shortest exact path: the text is decoded at every step, and ``decode``'s Python layers cost more than the
    decoding itself.

    When ``decode`` would do nothing but call the Rust tokenizer (a ``tokenizers``-backed tokenizer without
    space clean-up) and that tokenizer's decoder is GPT-2's byte-level one (GPT-2, Llama 3, Qwen, SmolLM,
    ``tiny``), decoding is the concatenation of the tokens' bytes read as UTF-8 with invalid bytes replaced,
    which a table of each token's bytes does in C (:func:`_byte_level_table`, checked against the tokenizer
    when built); with another decoder, the Rust tokenizer is called directly. (A class, not a closure: the
    environment pickles.)
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> None:
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase as Base

        try:
            from transformers.tokenization_utils_tokenizers import TokenizersBackend
        except ImportError:  # transformers 4: PreTrainedTokenizerFast
            from transformers import PreTrainedTokenizerFast as TokenizersBackend

        backend = getattr(tokenizer, "_tokenizer", None)
        plain = (
            isinstance(tokenizer, TokenizersBackend)
            and type(tokenizer).decode is Base.decode
            and type(tokenizer)._decode is TokenizersBackend._decode
            and not tokenizer.clean_up_tokenization_spaces
            and hasattr(backend, "decode")
        )
        self.tokenizer, self.backend = tokenizer, backend if plain else None
        self.table = _byte_level_table(backend, vocab_size) if plain else None

    def __call__(self, ids: list[int]) -> str:
        if self.table is not None:
            return _decode_bytes(self.table, ids)
        if self.backend is not None:
            return self.backend.decode(ids, skip_special_tokens=True)
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def _byte_level_table(backend: Any, vocab_size: int) -> list[bytes] | None:
    """The bytes each token id in ``[0, vocab_size)`` decodes to with ``skip_special_tokens=True``, for a Rust
    tokenizer whose decoder is ``decoders.ByteLevel`` (None for any other decoder).

    As ``tokenizers`` decodes: a token's characters mapped back through GPT-2's byte-to-character alphabet
    (the token's UTF-8 bytes if a character is outside it), special tokens and ids the tokenizer does not know
    dropped. The table is checked against the tokenizer on every added token and on random sequences, and
    not used (None) if any decodes differently.
    """
    from tokenizers import decoders

    if type(backend.decoder) is not decoders.ByteLevel:
        return None
    byte_of = {char: byte for byte, char in _gpt2_byte_alphabet().items()}
    added = backend.get_added_tokens_decoder()  # {id: AddedToken}
    table = [b""] * vocab_size
    for token, i in backend.get_vocab(with_added_tokens=True).items():
        if i < vocab_size and not (i in added and added[i].special):
            try:
                table[i] = bytes(byte_of[char] for char in token)
            except KeyError:
                table[i] = token.encode()
    rng = np.random.default_rng(0)
    probes = [[i] for i in added if i < vocab_size]
    probes += [rng.integers(0, vocab_size, int(n)).tolist() for n in rng.integers(1, 24, 64)]
    if any(_decode_bytes(table, ids) != backend.decode(ids, skip_special_tokens=True) for ids in probes):
        return None
    return table


def _decode_bytes(table: list[bytes], ids: list[int]) -> str:
    """``ids`` decoded through a :func:`_byte_level_table`: their bytes joined, read as UTF-8 with invalid
    bytes replaced (as ``tokenizers`` does)."""
    return b"".join(map(table.__getitem__, ids)).decode("utf-8", "replace")


def _gpt2_byte_alphabet() -> dict[int, str]:
    """GPT-2's map of the 256 byte values to printable characters (``bytes_to_unicode``), which byte-level
    tokenizers write their tokens in."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + k) for k, b in enumerate(others)}}


def step_values(infos: dict[str, Any], key: str, dones: np.ndarray) -> np.ndarray:
    """A vector step's ``infos[key]`` per row (N,), 0 where absent. With same-step autoreset a row that ended
    has restarted in the same step: its info is the new episode's, and this step's is in ``final_info``.

    Args:
        infos: the info of a vector env's step.
        key: a numeric info key (``"ref_log_prob"``, ``"score"``).
        dones: (N,) ``terminated | truncated`` of the step.
    """
    out = np.zeros(len(dones))
    for source, rows in ((infos, ~dones), (infos.get("final_info", {}), dones)):
        if key in source:
            present = source["_" + key] & rows
            out[present] = source[key][present]
    return out


def _objects(values: Sequence[Any]) -> np.ndarray:
    """A 1-D object array of ``values`` (never a 2-D one, whatever the values are)."""
    array = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):  # one by one: a list of equal-length arrays would broadcast as 2-D
        array[i] = value
    return array


def row_info(infos: dict[str, Any], i: int) -> dict[str, Any]:
    """Row ``i`` of a vector env's info: every key (not the ``_key`` masks), numpy scalars and strings."""
    return {key: value[i] for key, value in infos.items() if not key.startswith("_")}


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1; got {value!r}")
