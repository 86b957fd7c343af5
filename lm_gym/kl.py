"""KL between the policy and the frozen reference: per-token estimators and the coefficient's controllers.

With ``logp = log pi(a|s)`` and ``ref_logp = log pi_ref(a|s)`` for a token ``a`` *sampled from pi*:

* ``k1 = logp - ref_logp``: unbiased for KL(pi || pi_ref), can be negative for one sample; the estimator
  of the RLHF reward (Ziegler et al. 2019, eq. 2; InstructGPT eq. 2).
* ``k3 = (exp(l) - 1) - l`` with ``l = ref_logp - logp``: also unbiased, never negative, lower variance
  (Schulman, "Approximating KL divergence", 2020).
"""

from __future__ import annotations

import math
from typing import Literal, TypeVar

import numpy as np
import torch

__all__ = ["AdaptiveKLController", "FixedKLController", "kl_estimate"]

T = TypeVar("T", torch.Tensor, np.ndarray, float)
KLEstimator = Literal["k1", "k3"]


def kl_estimate(logp: T, ref_logp: T, estimator: KLEstimator = "k1") -> T:
    """Per-sample estimate of KL(pi || pi_ref) from the log-probs of the sampled tokens."""
    if estimator == "k1":
        return logp - ref_logp
    if estimator == "k3":
        log_ratio = ref_logp - logp
        exp = torch.exp if isinstance(log_ratio, torch.Tensor) else np.exp
        return exp(log_ratio) - 1 - log_ratio
    raise ValueError(f"kl estimator must be 'k1' or 'k3'; got {estimator!r}")


class FixedKLController:
    """A constant KL coefficient ``beta``.

    Args:
        kl_coef: the coefficient (current TRL's default is 0.05).
    """

    def __init__(self, kl_coef: float) -> None:
        if not (math.isfinite(kl_coef) and kl_coef >= 0):
            raise ValueError(f"kl_coef must be finite and >= 0; got {kl_coef}")
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
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

    ``e = clip(KL / target - 1, -0.2, 0.2)`` and ``beta <- beta * (1 + e * n_steps / horizon)``. Old TRL
    defaults: init 0.2, target 6, horizon 10000. RL4LMs replaces ``n_steps / horizon`` by a fixed gain of
    0.1 (pass ``gain=0.1``).

    Args:
        kl_coef: the initial ``beta``.
        target: the KL (nats per sequence) to track.
        horizon: steps over which a full correction is applied.
        gain: if given, used instead of ``n_steps / horizon``.
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

    def update(self, current_kl: float, n_steps: int) -> float:
        """Move ``beta`` after a rollout of ``n_steps`` whose mean KL was ``current_kl``; return it.

        Raises:
            ValueError: if ``current_kl`` is not finite (it would turn ``beta`` into NaN for good) or
                ``n_steps`` is negative.
        """
        current_kl = float(current_kl)
        if not math.isfinite(current_kl):
            raise ValueError(f"current_kl must be finite; got {current_kl}")
        if n_steps < 0:
            raise ValueError(f"n_steps must be >= 0; got {n_steps}")
        error = float(np.clip(current_kl / self.target - 1.0, -0.2, 0.2))
        step = self.gain if self.gain is not None else n_steps / self.horizon
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
