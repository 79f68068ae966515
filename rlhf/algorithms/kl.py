"""KL penalty: per-token estimators and the coefficient controllers."""

from typing import Dict

import torch

__all__ = ["KL_ESTIMATORS", "kl_estimate", "FixedKLController", "AdaptiveKLController"]

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token single-sample estimate of KL(pi || pi_ref) for tokens sampled from pi.

    Estimators from J. Schulman, "Approximating KL divergence" (2020), with
    ``log r = logprobs - ref_logprobs``:

    * ``"k1"``: ``log r``. Unbiased, high variance, can be negative per token.
    * ``"k2"``: ``0.5 * (log r)^2``. Biased as a value but low variance and
      always >= 0.
    * ``"k3"``: ``(1/r - 1) + log r = exp(ref - logp) - 1 - (ref - logp)``.
      Unbiased, always >= 0, lower variance than k1 (the ``1/r - 1`` term is
      a zero-mean control variate under samples from pi).

    As a value (the reward penalty of InstructGPT, ``kl.in_loss: false``)
    k1 and k3 estimate KL(pi || pi_ref) without bias. Used as a loss on
    tokens y ~ pi (``kl.in_loss: true``; the sampling itself is not
    differentiated), what matters is the expected gradient
    ``E_{y~pi}[grad_theta k(y)]`` (analysed in Tang & Munos 2025, "On a few
    pitfalls in KL divergence gradient estimation for RL"; GRPO, Shao et al.
    2024, eq. 4, puts k3 in its loss):

    * k1: ``grad log r = grad log pi``, and ``E_pi[grad log pi] =
      sum_y grad pi(y) = grad 1 = 0``: no penalty at all in expectation, only
      noise. Do not use k1 in the loss.
    * k2: ``grad 0.5 (log r)^2 = log r * grad log pi``, whose expectation
      ``sum_y grad pi(y) log(pi/pi_ref)(y)`` is ``grad KL(pi || pi_ref)``
      (the other term of that gradient, ``E_pi[grad log pi]``, is 0).
    * k3: ``grad (1/r - 1 + log r) = (1 - pi_ref/pi) * grad log pi``, whose
      expectation ``-sum_y pi_ref(y) grad log pi(y)`` is
      ``grad KL(pi_ref || pi)``: the gradient of the reverse KL, not of the
      KL whose value k3 estimates.

    Args:
        logprobs: ``(batch, seq)`` log pi(token) of the sampled tokens.
        ref_logprobs: ``(batch, seq)`` log pi_ref(token) of the same tokens.
        estimator: one of ``"k1"``, ``"k2"``, ``"k3"``.

    Returns:
        ``(batch, seq)`` per-token estimate; masking is left to the caller.
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.pow(2)
    if estimator == "k3":
        # Written with expm1 so that tokens where the policies agree (log r ~ 0)
        # do not lose precision in exp(.) - 1.
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; valid estimators are {', '.join(KL_ESTIMATORS)}")


class FixedKLController:
    """Constant KL coefficient beta (InstructGPT uses a fixed beta, Ouyang et al. 2022)."""

    def __init__(self, kl_coef: float) -> None:
        if kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op: present so both controllers can be used interchangeably."""

    def state_dict(self) -> Dict[str, float]:
        """Checkpointable state as plain python floats."""
        return {"value": self.value}

    def load_state_dict(self, state: Dict[str, float]) -> None:
        """Restore the coefficient saved by :meth:`state_dict`."""
        self.value = float(state["value"])


class AdaptiveKLController:
    """Proportional controller steering the measured KL towards ``target_kl``.

    Ziegler et al. 2019 ("Fine-Tuning Language Models from Human Preferences",
    eq. 2 and their released code)::

        e_t      = clip(KL_t / KL_target - 1, -0.2, 0.2)
        beta_t+1 = beta_t * (1 + e_t * n_steps / horizon)

    The clip bounds how far a single noisy KL measurement can move beta;
    ``n_steps / horizon`` makes the adaptation rate independent of how many
    samples each update covers.
    """

    def __init__(self, init_kl_coef: float, target_kl: float, horizon: float) -> None:
        if init_kl_coef < 0:
            raise ValueError(f"init_kl_coef must be >= 0, got {init_kl_coef}")
        if target_kl <= 0:
            raise ValueError(f"target_kl must be > 0, got {target_kl}")
        if horizon <= 0:
            raise ValueError(f"horizon must be > 0, got {horizon}")
        self.value = float(init_kl_coef)
        self.target_kl = float(target_kl)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Adjust beta after ``n_steps`` samples whose mean KL was ``current_kl``."""
        if n_steps < 0:
            raise ValueError(f"n_steps must be >= 0, got {n_steps}")
        error = min(max(float(current_kl) / self.target_kl - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> Dict[str, float]:
        """Checkpointable state as plain python floats.

        Hyper-parameters are included for inspection only; on load the
        constructor's ``target_kl``/``horizon`` (i.e. the current config) win.
        """
        return {"value": self.value, "target_kl": self.target_kl, "horizon": self.horizon}

    def load_state_dict(self, state: Dict[str, float]) -> None:
        """Restore the coefficient saved by :meth:`state_dict`."""
        self.value = float(state["value"])
