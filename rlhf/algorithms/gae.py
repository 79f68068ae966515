"""Generalised Advantage Estimation over token sequences."""

from typing import Tuple

import torch

__all__ = ["compute_gae"]


@torch.no_grad()
def compute_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-token GAE advantages and value targets (Schulman et al. 2016, eq. 16).

    Each row is one episode whose actions are the masked (response) tokens. The
    mask may have leading zeros (prompt, left padding) and trailing zeros
    (right padding); off-mask positions are skipped entirely, so the result on
    the response equals the computation on the response alone. In particular
    the episode ends at the last masked token: the bootstrap value after it is
    0, whatever ``values`` holds at later positions. Interior zeros (e.g.
    tool output spliced into a response) are skipped as well, so the masked
    tokens on either side of them are consecutive steps, discounted once.

    Rewards at off-mask positions are ignored: put the sequence-level score
    on the last response token, not on the EOS padding after it.

    Outputs are constants for the losses (targets and weights), hence the
    ``no_grad``: a value target that carried gradient would pull the critic's
    own prediction towards itself.

    Args:
        rewards: ``(batch, seq)`` per-token rewards (e.g. -beta*KL per token
            plus the reward-model score on the last response token).
        values: ``(batch, seq)`` critic estimates V(s_t) from the rollout.
        response_mask: ``(batch, seq)`` float or bool, 1 on response tokens.
        gamma: discount factor.
        lam: GAE lambda; 1 gives Monte-Carlo returns minus V, 0 gives the TD
            error.

    Returns:
        ``(advantages, returns)``, both ``(batch, seq)``, 0 off-mask, in
        float32 or wider (a bf16 reverse scan loses too much precision).
    """
    if rewards.shape != values.shape or rewards.shape != response_mask.shape:
        raise ValueError(
            f"rewards {tuple(rewards.shape)}, values {tuple(values.shape)} and "
            f"response_mask {tuple(response_mask.shape)} must have the same (batch, seq) shape"
        )
    dtype = torch.promote_types(torch.promote_types(rewards.dtype, values.dtype), torch.float32)
    rewards = rewards.to(dtype)
    values = values.to(dtype)
    keep = response_mask.to(torch.bool)
    zero = torch.zeros((), dtype=dtype, device=rewards.device)

    batch, seq = rewards.shape
    if seq == 0:
        return rewards.new_zeros(batch, 0), rewards.new_zeros(batch, 0)
    # Value and advantage of the next *masked* step; both start at 0 because
    # there is no step after the final response token (terminal state).
    next_value = torch.zeros(batch, dtype=dtype, device=rewards.device)
    next_adv = torch.zeros(batch, dtype=dtype, device=rewards.device)
    advantages = [zero.expand(batch)] * seq
    for t in range(seq - 1, -1, -1):
        k = keep[:, t]
        # TD residual delta_t = r_t + gamma V(s_{t+1}) - V(s_t)  (Schulman et al. 2016, eq. 10)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        # A_t = delta_t + gamma*lambda*A_{t+1}  (recursive form of Schulman et al. 2016, eq. 16)
        adv = torch.where(k, delta + gamma * lam * next_adv, zero)
        advantages[t] = adv
        # Off-mask positions must not become the "next step" of the token before them.
        next_value = torch.where(k, values[:, t], next_value)
        next_adv = torch.where(k, adv, next_adv)

    adv_t = torch.stack(advantages, dim=1)
    # lambda-return target for the critic: R_t = A_t + V(s_t)
    returns = torch.where(keep, adv_t + values, zero)
    return adv_t, returns
