"""The pieces of a trained role's update step, as plain functions of tensors.

Each PPO epoch walks global mini-batches in one shuffled order; every worker trains on its
share of each (`mini_batch_shares`), and each micro-batch's loss is weighted by the WHOLE
mini-batch (`actor_loss`, `critic_loss`, `ptx_loss`), so the summed gradients of all
micro-batches of all workers are those of the mini-batch's loss, for any number of workers.
Logged statistics are token-weighted the same way (`Means`).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from rlhf.algorithms import kl_estimate, masked_mean, value_loss
from rlhf.algorithms.losses import aggregate_loss, clipped_surrogate
from rlhf.algorithms.tis import truncated_is_weights
from rlhf.rollout.types import Experience


@dataclass
class MiniBatch:
    """One optimizer step: the global mini-batch and this worker's micro-batches of it."""

    samples: torch.Tensor
    """Global sample ids of the whole mini-batch (every worker's share)."""
    micro_batches: list[torch.Tensor]
    """This worker's share, cut into micro-batches."""


def mini_batch_shares(orders: Sequence[torch.Tensor], mini_batch_size: int, micro_batch_size: int, rank: int,
                      world_size: int) -> list[MiniBatch]:
    """The optimizer steps of an iteration in training order. Mini-batch j of an epoch is
    samples order[j·M : (j+1)·M]; worker r trains on its every W-th sample from position r, in
    micro-batches of `micro_batch_size` (M is a multiple of micro_batch_size · W)."""
    steps = []
    for order in orders:
        for start in range(0, len(order), mini_batch_size):
            samples = order[start : start + mini_batch_size]
            share = samples[rank::world_size]
            steps.append(MiniBatch(samples, [share[m : m + micro_batch_size]
                                             for m in range(0, len(share), micro_batch_size)]))
    return steps


@dataclass
class PolicyLossSettings:
    clip_eps: float = 0.2
    dual_clip: float | None = None
    entropy_coef: float = 0.0
    kl_in_loss: bool = False
    kl_estimator: str = "k1"
    aggregation: str = "token_mean"
    tis_cap: float | None = None
    """With the sampler's own log-probs in the rollout (vLLM), each token's surrogate is weighted
    by min(π_old / π_sampler, tis_cap) (rlhf/algorithms/tis.py); None: no correction."""


def actor_loss(logprobs: torch.Tensor, entropy: torch.Tensor | None, part: Experience, kl_coef: float,
               settings: PolicyLossSettings, denominator: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """This micro-batch's share of the mini-batch's actor loss: the clipped surrogate (Schulman
    et al. 2017, eq. 7), weighted by truncated importance weights where `settings.tis_cap` is
    set, minus the entropy bonus, plus β·KL to the reference when the KL is in
    the loss, each aggregated over the mini-batch by `settings.aggregation` (`denominator`:
    `loss_denominator` of the whole mini-batch). Summed over all micro-batches of all workers,
    these give the mini-batch's loss."""
    mask = part.rollout.response_mask
    per_token, stats = clipped_surrogate(logprobs, part.logprobs, part.advantages, mask, settings.clip_eps,
                                         settings.dual_clip)
    if settings.tis_cap is not None:
        if part.rollout.logprobs is None:
            raise RuntimeError("truncated importance sampling needs the sampler's log-probs in the rollout")
        weights, tis_stats = truncated_is_weights(part.logprobs, part.rollout.logprobs, mask, settings.tis_cap)
        per_token = per_token * weights
        stats = {**stats, **tis_stats}
    loss = aggregate_loss(per_token, mask, settings.aggregation, denominator)
    stats = {"policy_loss": masked_mean(per_token.detach(), mask), **stats}
    if entropy is not None and settings.entropy_coef:
        loss = loss - settings.entropy_coef * aggregate_loss(entropy, mask, settings.aggregation, denominator)
    if settings.kl_in_loss and kl_coef:
        kl = kl_estimate(logprobs, part.ref_logprobs, settings.kl_estimator)
        loss = loss + kl_coef * aggregate_loss(kl, mask, settings.aggregation, denominator)
    if entropy is not None:
        stats["entropy"] = masked_mean(entropy.detach(), mask)
    return loss, stats


def critic_loss(values: torch.Tensor, part: Experience, clip_eps: float | None, mini_batch_tokens: float
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """This micro-batch's share of the clipped value loss's token mean over the mini-batch."""
    mask = part.rollout.response_mask
    loss, stats = value_loss(values, part.values, part.returns, mask, clip_eps)
    share = loss * (float(mask.sum()) / max(mini_batch_tokens, 1.0))
    return share, {"value_loss": loss.detach(), "value_clip_frac": stats["clip_frac"]}


def ptx_loss(nll_sum: torch.Tensor, tokens_all_workers: float, coef: float) -> torch.Tensor:
    """PPO-ptx's γ·(pretraining LM loss) (Ouyang et al. 2022, eq. 2) as this worker's share:
    its NLL sum over the tokens of every worker's pretraining micro-batch."""
    return coef * nll_sum / max(tokens_all_workers, 1.0)


class Means:
    """Weighted means of logged statistics over an iteration's micro-batches, steps and workers.
    A micro-batch's statistics weigh by its response tokens, so the logged numbers are those of
    the whole batch whatever its split into micro-batches and workers; per-step numbers (grad
    norms) weigh 1."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.weights: dict[str, float] = {}

    def add(self, prefix: str = "", weight: float = 1.0, **values: float | torch.Tensor) -> None:
        for key, value in values.items():
            key = prefix + key
            self.sums[key] = self.sums.get(key, 0.0) + weight * float(value)
            self.weights[key] = self.weights.get(key, 0.0) + weight

    def result(self, world=None) -> dict[str, float]:
        """The means over this worker's additions, or over every worker's when given the
        `world` (a collective: every worker calls it with the same keys)."""
        sums, weights = dict(self.sums), dict(self.weights)
        if world is not None and world.world_size > 1:
            totals = world.all_reduce({**{f"s:{k}": v for k, v in sums.items()},
                                       **{f"w:{k}": v for k, v in weights.items()}}, op="sum")
            sums = {k: totals[f"s:{k}"] for k in sums}
            weights = {k: totals[f"w:{k}"] for k in weights}
        return {k: sums[k] / weights[k] if weights[k] else 0.0 for k in sums}


class PhaseTimes:
    """Wall-clock seconds of a role's update, whole and per phase, as perf/train_<role>_*
    metrics: the PPO training phase is most of a step, and these say where it goes. On the
    CPU every call returns when its work is done, so each phase is timed as it runs. On a GPU
    kernels run ahead of the host; the update's only synchronisation is the grad norm read back
    after each optimizer step, so there only the whole update is reported, and no
    synchronisation is added to split it."""

    def __init__(self, role: str, device: torch.device):
        self.role, self.split = role, device.type == "cpu"
        self.seconds: dict[str, float] = {}
        self.started = time.perf_counter()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            if self.split:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started

    def result(self) -> dict[str, float]:
        """{perf/train_<role>_seconds, perf/train_<role>_<phase>_seconds} (split on the CPU only)."""
        return {f"perf/train_{self.role}_seconds": time.perf_counter() - self.started,
                **{f"perf/train_{self.role}_{name}_seconds": value for name, value in self.seconds.items()}}
