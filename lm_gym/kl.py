"""KL between the policy and the frozen reference: per-token estimators and the coefficient's controllers.

With ``logp = log pi(a|s)`` and ``ref_logp = log pi_ref(a|s)`` for a token ``a`` *sampled from pi*, and
``l = ref_logp - logp`` (Schulman, "Approximating KL divergence", 2020):

* ``k1 = logp - ref_logp = -l``: unbiased for KL(pi || pi_ref), can be negative for one sample; the estimator
  of the RLHF reward (Ziegler et al. 2019, eq. 2; InstructGPT eq. 2).
* ``k2 = l**2 / 2``: biased (exact to second order near ``pi = pi_ref``), never negative, low variance.
* ``k3 = (exp(l) - 1) - l``: unbiased, never negative, lower variance than k1.

Their *values* estimate KL(pi || pi_ref) (k1 and k3 without bias); their *gradients* depend on how they are
used. With the expectation over ``a ~ pi`` taken exactly (``tests/lm_gym/test_kl.py`` checks each entry with
autograd on a small categorical):

=========  =================================================  ============================================
estimator  as a per-token reward (REINFORCE, ``f`` fixed):    in a loss differentiated through ``log pi``,
           ``E_pi[f * grad log pi]``                          on-policy samples: ``E_pi[grad f]``
=========  =================================================  ============================================
k1         grad KL(pi || pi_ref), unbiased                    0 in expectation
k2         not a KL gradient                                  grad KL(pi || pi_ref)
k3         not a KL gradient: grad KL(pi || pi_ref)           grad KL(pi_ref || pi) (the forward KL)
           - grad KL(pi_ref || pi), near 0 close to pi_ref,
           often at more than 90 degrees from it far away
=========  =================================================  ============================================

So the per-token KL penalty of ``TextGen-v1`` (the env's reference half plus the agent's own half) is k1,
always (:class:`lm_gym.env.TextGenEnv`); k3 stays here to log a KL's value, and k2 for losses.
"""

from __future__ import annotations

import math
from typing import Literal, TypeVar

import numpy as np
import torch

__all__ = ["AdaptiveKLController", "FixedKLController", "kl_estimate"]

T = TypeVar("T", torch.Tensor, np.ndarray, float)
KLEstimator = Literal["k1", "k2", "k3"]


def kl_estimate(logp: T, ref_logp: T, estimator: KLEstimator = "k1") -> T:
    """Per-sample estimate of KL(pi || pi_ref) from the log-probs of the sampled tokens (k1, k2 or k3 of the
    module docstring, which says which gradient each one gives)."""
    if estimator == "k1":
        return logp - ref_logp
    if estimator == "k2":
        return 0.5 * (logp - ref_logp) ** 2
    if estimator == "k3":
        log_ratio = ref_logp - logp
        exp = torch.exp if isinstance(log_ratio, torch.Tensor) else np.exp
        return exp(log_ratio) - 1 - log_ratio
    raise ValueError(f"kl estimator must be 'k1', 'k2' or 'k3'; got {estimator!r}")


class FixedKLController:
    """A constant KL coefficient ``beta``.

    Args:
        kl_coef: the coefficient (current TRL's default is 0.05).
    """

    def __init__(self, kl_coef: float) -> None:
        if not (math.isfinite(kl_coef) and kl_coef >= 0):
            raise ValueError(f"kl_coef must be finite and >= 0; got {kl_coef}")
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_samples: int) -> float:
        """Leave ``beta`` as it is and return it."""
        return self.value

    def state_dict(self) -> dict[str, float | int | None]:
        """What a checkpoint must keep to resume the controller."""
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float | int | None]) -> None:
        """Restore what :meth:`state_dict` saved."""
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. (2019), section 2.2: steer ``beta`` so that the observed KL tracks a target.

    ``e = clip(KL / target - 1, -0.2, 0.2)`` and ``beta <- beta * (1 + e * n_samples / horizon)``, where
    ``n_samples`` is the number of texts (samples) the KL was measured on, over all processes: Ziegler et
    al.'s code (lm-human-preferences, ``kl_ctl.update(kl, ppo.batch_size)``) and TRL's
    (``kl_ctl.update(kl, batch_size * num_processes)``). Old TRL defaults: init 0.2, target 6, horizon
    10000. RL4LMs replaces ``n_samples / horizon`` by a fixed gain of 0.1 (pass ``gain=0.1``).

    Args:
        kl_coef: the initial ``beta``.
        target: the KL (nats per sequence) to track.
        horizon: samples (texts, not tokens) over which a full correction is applied.
        gain: if given, used instead of ``n_samples / horizon``.
    """

    def __init__(
        self, kl_coef: float, target: float, horizon: int = 10_000, gain: float | None = None
    ) -> None:
        super().__init__(kl_coef)
        self._configure(target, horizon, gain)

    def _configure(self, target: float, horizon: int, gain: float | None) -> None:
        if not (math.isfinite(target) and target > 0):
            raise ValueError(f"target KL must be finite and > 0; got {target}")
        if horizon <= 0:
            raise ValueError(f"horizon must be > 0; got {horizon}")
        if gain is not None and not (math.isfinite(gain) and gain > 0):
            raise ValueError(f"gain must be finite and > 0 (or None); got {gain}")
        self.target = float(target)
        self.horizon = int(horizon)
        self.gain = None if gain is None else float(gain)

    def update(self, current_kl: float, n_samples: int) -> float:
        """Move ``beta`` after a batch of ``n_samples`` texts whose mean KL per text was ``current_kl``;
        return it.

        Raises:
            ValueError: if ``current_kl`` is not finite (it would turn ``beta`` into NaN for good) or
                ``n_samples`` is negative.
        """
        current_kl = float(current_kl)
        if not math.isfinite(current_kl):
            raise ValueError(f"current_kl must be finite; got {current_kl}")
        if n_samples < 0:
            raise ValueError(f"n_samples must be >= 0; got {n_samples}")
        error = float(np.clip(current_kl / self.target - 1.0, -0.2, 0.2))
        step = self.gain if self.gain is not None else n_samples / self.horizon
        self.value *= 1.0 + error * step
        return self.value

    def state_dict(self) -> dict[str, float | int | None]:
        """``beta`` and the settings that steer it, so a resumed run tracks the same target."""
        return {"value": self.value, "target": self.target, "horizon": self.horizon, "gain": self.gain}

    def load_state_dict(self, state: dict[str, float | int | None]) -> None:
        """Restore what :meth:`state_dict` saved (a state holding only ``value`` keeps the settings)."""
        self._configure(
            state.get("target", self.target), state.get("horizon", self.horizon), state.get("gain", self.gain)
        )
        super().load_state_dict(state)
