"""PPO pieces used by stages/ppo.py: turning a rollout into experience (rewards, advantages)
and the clipped actor/critic updates (with the PPO-ptx term)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from rlhf.algorithms import (
    compute_gae,
    explained_variance,
    kl_estimate,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    value_loss,
)
from rlhf.algorithms.rewards import RunningMoments, normalize_scores, shape_rewards
from rlhf.config import PPOConfig
from rlhf.distributed.strategy import Strategy
from rlhf.roles.forward import policy_logprobs, response_values
from rlhf.roles.roles import Actor, Critic, Reference, RewardModel
from rlhf.rollout.types import Experience, Rollout
from rlhf.training.lm import lm_forward_nll


@dataclass
class RewardNormalizer:
    """Turns raw RM scores into the scalar PPO optimises: normalise, penalise, clip."""

    mode: str
    clip: float
    missing_eos_penalty: float | None
    stats_mean: float = 0.0
    stats_std: float = 1.0
    running: RunningMoments | None = None

    def __call__(self, raw: torch.Tensor, eos_found: torch.Tensor) -> torch.Tensor:
        scores = raw.float()
        if self.mode == "rm_stats":
            scores = normalize_scores(scores, self.stats_mean, self.stats_std)
        elif self.mode == "running":
            self.running.update(scores)
            scores = normalize_scores(scores, self.running.mean, self.running.std)
        if self.missing_eos_penalty is not None:
            scores = scores + self.missing_eos_penalty * (~eos_found).float()
        return scores.clamp(-self.clip, self.clip) if self.clip > 0 else scores


def _sequence_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(batch,) summed per-token log-ratio: an unbiased estimate of KL(π || π_ref) per response."""
    return ((logprobs - ref_logprobs) * mask).sum(-1)


@torch.no_grad()
def make_experience(
    rollout: Rollout,
    actor: Actor,
    reference: Reference,
    critic: Critic,
    reward_model: RewardModel,
    normalizer: RewardNormalizer,
    cfg: PPOConfig,
    kl_coef: float,
) -> tuple[Experience | None, dict]:
    """Score a rollout and compute per-token rewards, advantages and returns. When a score,
    log-prob or value is not finite, returns (None, {"ppo/nonfinite": names}) instead."""
    mask = rollout.response_mask
    # The sampler's own log-probs are π_old on these tokens: no second actor forward.
    reuse = cfg.rollout.reuse_logprobs and rollout.logprobs is not None
    logprobs = rollout.logprobs if reuse else actor.logprobs(rollout)
    ref_logprobs = reference.logprobs(rollout)
    values = critic.values(rollout)
    raw = reward_model.scores(rollout)
    bad = [name for name, t in (("reward", raw), ("logprobs", logprobs), ("ref_logprobs", ref_logprobs),
                                ("values", values)) if not bool(torch.isfinite(t).all())]
    if bad:
        # Before the normaliser sees it: one NaN would poison its running statistics.
        return None, {"ppo/nonfinite": ",".join(bad)}
    scores = normalizer(raw, rollout.eos_found)
    kl = kl_estimate(logprobs, ref_logprobs, cfg.kl.estimator) * mask
    rewards = shape_rewards(scores, kl, mask, 0.0 if cfg.kl.in_loss else kl_coef)
    advantages, returns = compute_gae(rewards, values * mask, mask, cfg.ppo.gamma, cfg.ppo.lam)
    if cfg.ppo.whiten_advantages:
        advantages = masked_whiten(advantages, mask)
    experience = Experience(rollout, logprobs, ref_logprobs, values, rewards, advantages, returns, raw)
    lengths = rollout.response_lengths.float()
    metrics = {
        "ppo/reward_raw": float(raw.mean()),
        "ppo/reward_normalized": float(scores.mean()),
        "ppo/kl": float(_sequence_kl(logprobs, ref_logprobs, mask).mean()),
        "ppo/kl_estimator_mean": float(kl.sum(-1).mean()),
        "ppo/kl_coef": kl_coef,
        "ppo/response_length": float(lengths.mean()),
        "ppo/eos_rate": float(rollout.eos_found.float().mean()),
        "ppo/advantage_mean": float(masked_mean(advantages, mask)),
        "ppo/advantage_std": float(advantages[mask > 0].std()) if mask.sum() > 1 else 0.0,
        "ppo/return_mean": float(masked_mean(returns, mask)),
        "ppo/value_mean": float(masked_mean(values, mask)),
        "ppo/explained_variance": float(explained_variance(values, returns, mask)),
    }
    return experience, metrics


class _Means:
    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, **values: float) -> None:
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value)
            self.counts[key] = self.counts.get(key, 0) + 1

    def result(self) -> dict[str, float]:
        return {k: self.sums[k] / self.counts[k] for k in self.sums}


def shuffle_orders(generator: torch.Generator, epochs: int, size: int) -> list[torch.Tensor]:
    """One permutation of a worker's `size` samples per PPO epoch. Actor and critic walk the
    same mini-batches, so the orders are drawn once and handed to both."""
    return [torch.randperm(size, generator=generator) for _ in range(epochs)]


def _mini_batches(experience: Experience, orders: Sequence[torch.Tensor], strategy: Strategy, cfg: PPOConfig):
    """(mini-batch index, [(micro-batch, weight)]) in training order. A micro-batch's weight is
    its share of the mini-batch's response tokens over all workers, so the summed gradients
    are those of the token mean over the whole mini-batch."""
    total = experience.rollout.sequences.shape[0]
    device = experience.rollout.sequences.device
    mini, micro = cfg.ppo.mini_batch_size // strategy.world_size, cfg.ppo.micro_batch_size
    index = 0
    for order in orders:
        for start in range(0, total, mini):
            batch = experience.select(order[start : start + mini].to(device))
            tokens = max(strategy.all_reduce({"n": float(batch.rollout.response_mask.sum())}, op="sum")["n"], 1.0)
            size = batch.rollout.sequences.shape[0]
            parts = [batch.select(torch.arange(m, min(m + micro, size), device=device)).trimmed()
                     for m in range(0, size, micro)]
            yield index, [(part, float(part.rollout.response_mask.sum()) / tokens) for part in parts]
            index += 1


def actor_update(
    experience: Experience,
    actor: Actor,
    strategy: Strategy,
    cfg: PPOConfig,
    kl_coef: float,
    orders: Sequence[torch.Tensor],
    ptx_batch: Callable[[int], object] | None,
    step_offset: int,
) -> dict[str, float]:
    """Clipped policy-gradient steps (plus entropy, in-loss KL and the PPO-ptx LM term), one
    optimizer step per mini-batch. Losses are token means over the whole mini-batch."""
    algo = cfg.ppo
    means = _Means()
    for step, micro_batches in _mini_batches(experience, orders, strategy, cfg):
        for part, weight in micro_batches:
            mask = part.rollout.response_mask
            logprobs, entropy = policy_logprobs(actor.trained.module, part.rollout, cfg.rollout.temperature,
                                                with_entropy=True, entropy_grad=algo.entropy_coef != 0)
            pg_loss, pg_stats = ppo_policy_loss(logprobs, part.logprobs, part.advantages, mask, algo.clip_eps)
            entropy_mean = masked_mean(entropy, mask)
            loss = pg_loss - algo.entropy_coef * entropy_mean if algo.entropy_coef else pg_loss
            if cfg.kl.in_loss:
                loss = loss + kl_coef * masked_mean(kl_estimate(logprobs, part.ref_logprobs, cfg.kl.estimator), mask)
            strategy.backward(actor.trained, loss * weight)
            means.add(**{"ppo/policy_loss": pg_loss.detach(), "ppo/entropy": entropy_mean.detach(),
                         "ppo/clip_frac": pg_stats["clip_frac"], "ppo/approx_kl": pg_stats["approx_kl"]})
        if ptx_batch is not None:
            ptx = ptx_batch(step_offset + step).to(strategy.device)
            nll, n = lm_forward_nll(actor.trained.module, ptx)
            n_total = strategy.all_reduce({"n": float(n)}, op="sum")["n"]
            strategy.backward(actor.trained, algo.ptx_coef * nll / max(n_total, 1.0))
            means.add(**{"ppo/ptx_loss": float(nll.detach()) / max(n, 1)})
        means.add(**{"ppo/actor_grad_norm": strategy.step(actor.trained)})
    return means.result()


def critic_update(
    experience: Experience, critic: Critic, strategy: Strategy, cfg: PPOConfig, orders: Sequence[torch.Tensor]
) -> dict[str, float]:
    """Clipped value-loss steps over the same mini-batches as the actor's."""
    algo = cfg.ppo
    means = _Means()
    for _, micro_batches in _mini_batches(experience, orders, strategy, cfg):
        for part, weight in micro_batches:
            mask = part.rollout.response_mask
            values = response_values(critic.trained.module, part.rollout)
            vf_loss, vf_stats = value_loss(values, part.values, part.returns, mask, algo.value_clip_eps)
            strategy.backward(critic.trained, vf_loss * weight)
            means.add(**{"ppo/value_loss": vf_loss.detach(), "ppo/value_clip_frac": vf_stats["clip_frac"]})
        means.add(**{"ppo/critic_grad_norm": strategy.step(critic.trained)})
    return means.result()
