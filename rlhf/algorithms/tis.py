"""Truncated importance sampling (TIS) for a sampler that is not the trainer's forward.

A fast inference engine (vLLM) samples from π_sampler, whose kernels and precision differ from
the trainer's forward π_old even with identical weights, so the PPO ratio π_θ / π_old is taken
on tokens drawn from another distribution. TIS reweights each token's policy loss by the
importance weight π_old / π_sampler, truncated at C to bound its variance (Yao et al. 2025,
"Your Efficient RL Framework Secretly Brings You Off-Policy RL Training"; the truncation as in
Espeholt et al. 2018, IMPALA's V-trace). The weight is a constant of the loss: no gradient
flows through it.
"""

from __future__ import annotations

import math

import torch

from rlhf.algorithms.masked import masked_mean


def truncated_is_weights(old_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, mask: torch.Tensor,
                         cap: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(batch, seq) weights min(exp(old - sampler), cap), 0 off the mask, detached; and stats:
    the weights' mean and the share of tokens truncated, over the mask."""
    if cap < 1:
        raise ValueError(f"cap must be >= 1, got {cap}")
    log_ratio = (old_logprobs - sampler_logprobs).detach()
    # The cap is applied to the log-ratio, before exp: a token far likelier under π_old than
    # under the sampler would overflow to inf first (and inf * 0 off the mask is NaN).
    limit = math.log(cap)
    truncated = (log_ratio > limit).to(old_logprobs.dtype)
    weights = torch.exp(log_ratio.clamp(max=limit)) * mask
    return weights, {"tis_weight": masked_mean(weights, mask), "tis_truncated_frac": masked_mean(truncated, mask)}


def logprob_gap(trainer_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean |log π_trainer - log π_sampler| over the response tokens: how far the sampler's
    numbers are from the trainer's forward on the same weights and tokens."""
    return masked_mean((trainer_logprobs - sampler_logprobs).abs(), mask)
