"""Per-token PPO rewards: the sequence score on the last response token plus a KL penalty.

Ziegler et al. 2019 / Ouyang et al. 2022: R(x, y) = r(x, y) - β·log(π(y|x) / π_SFT(y|x)),
spread over tokens as -β·KL_t on every response token and r on the last one.
"""

from __future__ import annotations

import math

import torch


def last_response_index(response_mask: torch.Tensor) -> torch.Tensor:
    """(batch,) index of the last response token (the EOS, or the last token of a response
    cut at max_new_tokens). Response masks are contiguous from column 0."""
    positions = torch.arange(response_mask.shape[1], device=response_mask.device)
    return (positions * (response_mask > 0).long()).argmax(dim=-1)


def place_scores(scores: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """(batch, resp) zeros except the score on each sequence's last response token."""
    placed = torch.zeros_like(response_mask, dtype=scores.dtype)
    return placed.scatter(1, last_response_index(response_mask).unsqueeze(1), scores.unsqueeze(1))


def shape_rewards(
    scores: torch.Tensor, kl: torch.Tensor, response_mask: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """(batch, resp) rewards: -kl_coef·kl on response tokens, plus the score on the last one."""
    mask = response_mask.to(kl.dtype)
    return place_scores(scores.to(kl.dtype), response_mask) - kl_coef * kl * mask


def normalize_scores(scores: torch.Tensor, mean: float, std: float, clip: float = 0.0) -> torch.Tensor:
    """(r - mean) / std, then clipped to [-clip, clip] when clip > 0."""
    out = (scores - mean) / max(std, 1e-8)
    return out.clamp(-clip, clip) if clip > 0 else out


class RunningMoments:
    """Mean and standard deviation over every score seen so far (Chan et al.'s parallel
    update), for reward normalisation without RM statistics. State is plain floats."""

    def __init__(self) -> None:
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else 1.0

    def update(self, values: torch.Tensor) -> None:
        n = values.numel()
        if n == 0:
            return
        batch_mean = float(values.mean())
        batch_m2 = float(((values - batch_mean) ** 2).sum())
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta**2 * self.count * n / total
        self.count = total

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])
