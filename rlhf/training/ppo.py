"""PPO glue of the loop (stages/ppo.py), as plain functions of tensors.

One iteration: the workers roll out their share of the prompts and score it (a `Scored`
batch, rlhf/rollout/types.py), joined into the global batch in prompt order, identical on every
worker (rlhf/rollout/gather.py); `make_experience` turns it into per-token rewards, advantages
and returns, normalising scores and whitening advantages over the global batch; each PPO epoch
then walks global mini-batches of one shuffled order (`shuffle_orders`), every trained role
updating on its share of each (rlhf/roles/update.py). The result does not depend on how many
workers there are, up to float rounding. `PPOState` is what a checkpoint keeps besides models.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf.algorithms import (
    AdaptiveKLController,
    FixedKLController,
    compute_gae,
    explained_variance,
    kl_estimate,
    masked_mean,
    masked_whiten,
)
from rlhf.algorithms.advantages import (
    broadcast_to_tokens,
    group_stats,
    grpo_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
    uniform_groups,
)
from rlhf.algorithms.repetition import repeated_ngram_share
from rlhf.algorithms.rewards import RunningMoments, normalize_scores, shape_rewards
from rlhf.algorithms.tis import logprob_gap
from rlhf.rollout.types import Experience, Scored
from rlhf.training.ema import EMA


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
                    kl_in_loss: bool, gamma: float, lam: float, whiten_advantages: bool, advantage: str = "gae",
                    group_size: int = 1, repetition_ngram: int = 3) -> tuple[Experience, dict[str, float]]:
    """Per-token rewards (the normalised score on the last response token, minus β·KL on every
    response token unless the KL goes into the loss), advantages and returns, and the batch's
    metrics. `scored` is the global batch (see `gather_scored`), in groups of `group_size`
    answers per prompt. `advantage`:
    - gae: the critic's values and GAE (Schulman et al. 2016), whitened if asked;
    - grpo / dr_grpo / rloo: each answer's sequence reward (score - β·Σ KL) against its group
      (Shao et al. 2024; Liu et al. 2025; Ahmadian et al. 2024), on every response token;
    - reinforce_pp: discounted returns of the per-token rewards, whitened over the global batch
      (Hu 2025).
    ppo/repetition is the mean share of an answer's `repetition_ngram`-grams that repeat an
    earlier one of that answer (a health alarm watches it)."""
    rollout, mask = scored.rollout, scored.rollout.response_mask
    scores = normalizer(scored.scores, rollout.eos_found)
    kl = kl_estimate(scored.logprobs, scored.ref_logprobs, kl_estimator) * mask
    beta = 0.0 if kl_in_loss else kl_coef
    rewards = shape_rewards(scores, kl, mask, beta)
    if advantage == "gae":
        advantages, returns = compute_gae(rewards, scored.values * mask, mask, gamma, lam)
        if whiten_advantages:
            advantages = masked_whiten(advantages, mask)
    elif advantage == "reinforce_pp":
        advantages = returns = reinforce_pp_advantages(rewards, mask, gamma)
    else:
        sequence_rewards = scores - beta * kl.sum(-1)
        per_answer = (rloo_advantages(sequence_rewards, group_size) if advantage == "rloo"
                      else grpo_advantages(sequence_rewards, group_size, scale=advantage == "grpo"))
        advantages = returns = broadcast_to_tokens(per_answer, mask)
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
        "ppo/repetition": float(repeated_ngram_share(rollout.responses, mask, repetition_ngram).mean()),
        "ppo/advantage_mean": float(masked_mean(advantages, mask)),
        "ppo/advantage_std": float(advantages[mask > 0].std()) if mask.sum() > 1 else 0.0,
        **{f"reward/{name}": float(values.float().mean()) for name, values in sorted(scored.sources.items())},
    }
    if rollout.logprobs is not None:  # the sampler's own numbers beside the actor's (0 where they are reused)
        metrics["rollout/logprob_gap"] = float(logprob_gap(scored.logprobs, rollout.logprobs, mask))
    if advantage == "gae":
        metrics.update({"ppo/return_mean": float(masked_mean(returns, mask)),
                        "ppo/value_mean": float(masked_mean(scored.values, mask)),
                        "ppo/explained_variance": float(explained_variance(scored.values, returns, mask))})
    if group_size > 1:
        metrics.update({f"ppo/{name}": float(value) for name, value in group_stats(scores, group_size).items()})
    return experience, metrics


def update_samples(scores: torch.Tensor, group_size: int, drop_uniform: bool, mini_batch_size: int) -> torch.Tensor:
    """The global batch's samples an update trains on, in order: every one, or, with
    `drop_uniform`, those of the groups whose rewards differ, plus as few of the dropped ones as
    fill the last mini-batch (a uniform group's answers have zero advantage under the group
    estimators: they only cost compute)."""
    everything = torch.arange(scores.shape[0])
    if not drop_uniform or group_size < 2:
        return everything
    uniform = uniform_groups(scores, group_size).repeat_interleave(group_size)
    kept, dropped = everything[~uniform], everything[uniform]
    fill = -len(kept) % mini_batch_size
    return torch.cat([kept, dropped[:fill]]).sort().values if len(kept) else kept


def shuffle_orders(generator: torch.Generator, epochs: int, size: int | torch.Tensor) -> list[torch.Tensor]:
    """One permutation per PPO epoch of the global batch's samples (`size` of them, or the
    sample ids given), drawn once and handed to actor and critic, which walk the same
    mini-batches."""
    samples = torch.arange(size) if isinstance(size, int) else size
    return [samples[torch.randperm(len(samples), generator=generator)] for _ in range(epochs)]


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
