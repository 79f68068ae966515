"""PPO glue between the roles and the algorithms, as plain functions of tensors.

One iteration: the workers roll out their share of the prompts and score it (log-probs,
reference log-probs, values, reward-model scores: a `Scored` batch); `gather_scored` joins the
shares into the global batch in prompt order, identical on every worker; `make_experience`
turns it into per-token rewards, advantages and returns (normalising scores and whitening
advantages over the global batch); then each PPO epoch walks global mini-batches in one
shuffled order, every worker training on its share of each (`mini_batch_shares`) with losses
weighted by the whole mini-batch (`actor_loss`, `critic_loss`). The result does not depend on
how many workers there are, up to float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from rlhf.algorithms import (
    AdaptiveKLController,
    FixedKLController,
    compute_gae,
    explained_variance,
    kl_estimate,
    masked_mean,
    masked_whiten,
    value_loss,
)
from rlhf.algorithms.losses import aggregate_loss, clipped_surrogate
from rlhf.algorithms.rewards import RunningMoments, normalize_scores, shape_rewards
from rlhf.rollout.types import Experience, Rollout
from rlhf.training.ema import EMA
from rlhf.training.guards import NonFinite


@dataclass
class Scored:
    """A rollout with everything the roles compute for it, before rewards. Per-token tensors
    are (batch, response_length), aligned with `rollout.response_mask`."""

    rollout: Rollout
    logprobs: torch.Tensor
    """Actor log-probs of the sampled tokens at rollout time (π_old, temperature-scaled)."""
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    """Critic values V(s) of the state before each response token."""
    scores: torch.Tensor
    """(batch,) raw reward-model scores."""

    def nonfinite(self) -> NonFinite | None:
        bad = tuple(name for name, t in (("reward", self.scores), ("logprobs", self.logprobs),
                                         ("ref_logprobs", self.ref_logprobs), ("values", self.values))
                    if not bool(torch.isfinite(t).all()))
        return NonFinite(bad) if bad else None


# -- the global batch -------------------------------------------------------------------------
_TOKEN_FIELDS = ("logprobs", "ref_logprobs", "values")


def gather_scored(scored: Scored, world, pad_token_id: int) -> Scored:
    """Every worker's `Scored` share joined into the global batch, identical on all workers.
    Worker r holds global samples r, r + W, r + 2W, ... (the prompt stream's order), so row i
    of worker r is global sample i·W + r. Shares are padded to the widest prompt and response
    before the collective; a world of one returns `scored` unchanged."""
    if world.world_size == 1:
        return scored
    rollout = scored.rollout
    widths = world.all_reduce({"prompt": rollout.prompt_length, "response": rollout.response_mask.shape[1]}, op="max")
    prompt_width, response_width = int(widths["prompt"]), int(widths["response"])
    padded = rollout.padded(prompt_width, response_width, pad_token_id)
    right = response_width - rollout.response_mask.shape[1]
    local = {
        "sequences": padded.sequences, "attention_mask": padded.attention_mask,
        "response_mask": padded.response_mask, "eos_found": padded.eos_found.to(torch.uint8),
        "scores": scored.scores.float(),
        **{name: torch.nn.functional.pad(getattr(scored, name).float(), (0, right)) for name in _TOKEN_FIELDS},
    }
    if rollout.logprobs is not None:
        local["rollout_logprobs"] = padded.logprobs
    joined = {name: _interleave(world.all_gather(tensor)) for name, tensor in local.items()}
    global_rollout = Rollout(joined["sequences"], joined["attention_mask"], prompt_width, joined["response_mask"],
                             joined["eos_found"].bool(), joined.get("rollout_logprobs"))
    return Scored(global_rollout, joined["logprobs"], joined["ref_logprobs"], joined["values"], joined["scores"])


def _interleave(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Rows of worker shares [worker, row] in global order row·W + worker."""
    stacked = torch.stack(list(parts), dim=1)
    return stacked.reshape(-1, *stacked.shape[2:])


def local_rows(rows: int, rank: int, world_size: int) -> torch.Tensor:
    """Global sample ids of a worker's `rows` local samples (see `gather_scored`)."""
    return torch.arange(rows) * world_size + rank


# -- rewards and advantages ------------------------------------------------------------------
@dataclass
class RewardNormalizer:
    """Turns raw reward-model scores into the scalar PPO optimises: normalise, penalise a
    missing EOS, clip. Called on the global batch, so running moments are the same on every
    worker and for any number of workers."""

    mode: str
    """rm_stats: with the RM stage's eval statistics; running: with the moments of every score
    seen so far; none."""
    clip: float
    missing_eos_penalty: float | None
    """Subtracted (as a magnitude: its sign is ignored) from the normalised score of responses
    cut at max_new_tokens without EOS, before clipping."""
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
        if self.missing_eos_penalty:
            scores = scores - abs(self.missing_eos_penalty) * (~eos_found).float()
        return scores.clamp(-self.clip, self.clip) if self.clip > 0 else scores


@torch.no_grad()
def make_experience(scored: Scored, normalizer: RewardNormalizer, kl_coef: float, kl_estimator: str,
                    kl_in_loss: bool, gamma: float, lam: float, whiten_advantages: bool
                    ) -> tuple[Experience, dict[str, float]]:
    """Per-token rewards (the normalised score on the last response token, minus β·KL on every
    response token unless the KL goes into the loss), GAE advantages and returns, and the
    batch's metrics. `scored` is the global batch (see `gather_scored`)."""
    rollout, mask = scored.rollout, scored.rollout.response_mask
    scores = normalizer(scored.scores, rollout.eos_found)
    kl = kl_estimate(scored.logprobs, scored.ref_logprobs, kl_estimator) * mask
    rewards = shape_rewards(scores, kl, mask, 0.0 if kl_in_loss else kl_coef)
    advantages, returns = compute_gae(rewards, scored.values * mask, mask, gamma, lam)
    if whiten_advantages:
        advantages = masked_whiten(advantages, mask)
    experience = Experience(rollout, scored.logprobs, scored.ref_logprobs, scored.values, rewards, advantages, returns,
                            scored.scores)
    # An unbiased estimate of KL(π || π_ref) per response: the summed per-token log-ratio.
    sequence_kl = ((scored.logprobs - scored.ref_logprobs) * mask).sum(-1)
    metrics = {
        "ppo/reward_raw": float(scored.scores.float().mean()),
        "ppo/reward_normalized": float(scores.mean()),
        "ppo/kl": float(sequence_kl.mean()),
        "ppo/kl_estimator_mean": float(kl.sum(-1).mean()),
        "ppo/kl_coef": kl_coef,
        "ppo/response_length": float(rollout.response_lengths.float().mean()),
        "ppo/eos_rate": float(rollout.eos_found.float().mean()),
        "ppo/advantage_mean": float(masked_mean(advantages, mask)),
        "ppo/advantage_std": float(advantages[mask > 0].std()) if mask.sum() > 1 else 0.0,
        "ppo/return_mean": float(masked_mean(returns, mask)),
        "ppo/value_mean": float(masked_mean(scored.values, mask)),
        "ppo/explained_variance": float(explained_variance(scored.values, returns, mask)),
    }
    return experience, metrics


# -- mini-batches ----------------------------------------------------------------------------
def shuffle_orders(generator: torch.Generator, epochs: int, size: int) -> list[torch.Tensor]:
    """One permutation of the global batch's `size` samples per PPO epoch, drawn once and
    handed to actor and critic, which walk the same mini-batches."""
    return [torch.randperm(size, generator=generator) for _ in range(epochs)]


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


# -- losses of a micro-batch ------------------------------------------------------------------
@dataclass
class PolicyLossSettings:
    clip_eps: float = 0.2
    dual_clip: float | None = None
    entropy_coef: float = 0.0
    kl_in_loss: bool = False
    kl_estimator: str = "k1"
    aggregation: str = "token_mean"


def actor_loss(logprobs: torch.Tensor, entropy: torch.Tensor | None, part: Experience, kl_coef: float,
               settings: PolicyLossSettings, denominator: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """This micro-batch's share of the mini-batch's actor loss: the clipped surrogate (Schulman
    et al. 2017, eq. 7), minus the entropy bonus, plus β·KL to the reference when the KL is in
    the loss, each aggregated over the mini-batch by `settings.aggregation` (`denominator`:
    `loss_denominator` of the whole mini-batch). Summed over all micro-batches of all workers,
    these give the mini-batch's loss."""
    mask = part.rollout.response_mask
    per_token, stats = clipped_surrogate(logprobs, part.logprobs, part.advantages, mask, settings.clip_eps,
                                         settings.dual_clip)
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
    """Running means of logged statistics over an iteration's micro-batches and steps."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, prefix: str = "", **values: float | torch.Tensor) -> None:
        for key, value in values.items():
            key = prefix + key
            self.sums[key] = self.sums.get(key, 0.0) + float(value)
            self.counts[key] = self.counts.get(key, 0) + 1

    def result(self) -> dict[str, float]:
        return {k: self.sums[k] / self.counts[k] for k in self.sums}


def rollout_seed(seed: int, iteration: int) -> int:
    """The sampling seed of an iteration's rollouts: a rollout depends on the seed, the
    iteration and each sample's global id alone, whatever ran before it."""
    return seed * 1_000_003 + iteration * 7_919


class PPOState:
    """What a PPO checkpoint holds besides the models: the KL controller, the reward
    normaliser's running moments, the mini-batch shuffling generator and the EMA weights, so
    that a resumed run replays the next iteration exactly."""

    def __init__(self, kl_controller, normalizer: RewardNormalizer, shuffle_rng: torch.Generator, ema=None):
        self.kl_controller, self.normalizer, self.shuffle_rng, self.ema = kl_controller, normalizer, shuffle_rng, ema

    @classmethod
    def from_config(cls, cfg, reward_stats, actor_module: torch.nn.Module | None) -> "PPOState":
        """From a PPOConfig; `reward_stats` of the RM export (or None); the EMA follows
        `actor_module` when `ppo.ema_decay` > 0."""
        kl = cfg.kl
        controller = AdaptiveKLController(kl.coef, kl.target, kl.horizon) if kl.adaptive else FixedKLController(kl.coef)
        normalizer = RewardNormalizer(cfg.reward.normalize, cfg.reward.clip, cfg.reward.missing_eos_penalty,
                                      reward_stats.mean if reward_stats else 0.0, reward_stats.std if reward_stats else 1.0,
                                      RunningMoments())
        ema = EMA(actor_module, cfg.ppo.ema_decay) if cfg.ppo.ema_decay > 0 else None
        return cls(controller, normalizer, torch.Generator().manual_seed(cfg.seed), ema)

    def state_dict(self) -> dict:
        return {"kl_controller": self.kl_controller.state_dict(), "reward_normalizer": self.normalizer.running.state_dict(),
                "shuffle_rng": self.shuffle_rng.get_state(), **({"ema": self.ema.state_dict()} if self.ema else {})}

    def load_state_dict(self, state: dict) -> None:
        self.kl_controller.load_state_dict(state["kl_controller"])
        self.normalizer.running.load_state_dict(state["reward_normalizer"])
        self.shuffle_rng.set_state(state["shuffle_rng"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
