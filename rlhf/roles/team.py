"""The four PPO roles as the PPO loop sees them.

`LocalRoles` holds all four in this process and trains through its Strategy (one process, or
one SPMD worker among many under torchrun / Ray). rlhf/ray/ppo_roles.py gives the same shape
with each role a Ray actor group. The loop calls only what is here: `generate` (this process's
share of the prompts), `score` (the global batch, scored), `update`, `rewards` (every reward
source behind one call), `trained()` for checkpoints, `policy` for the export, `models()` for the
FLOP counter and `shutdown()`.
"""

from __future__ import annotations

from typing import Sequence

import torch

from rlhf.config import PPOConfig
from rlhf.data.prompt_dataset import PromptBatch
from rlhf.distributed.strategy import Strategy, TrainedModel
from rlhf.roles.build import build_actor, build_critic, build_reference, build_reward_model
from rlhf.roles.rewards import RewardSources
from rlhf.roles.roles import Actor, Critic, Reference, RoleForwards
from rlhf.rollout.engine import SamplingParams
from rlhf.rollout.gather import gather_scored, local_rows
from rlhf.rollout.types import Experience, Rollout, Scored


def score(rollout: Rollout, actor: Actor, reference: Reference | None, critic: Critic | None, rewards,
          prompts: PromptBatch, reuse_logprobs: bool) -> Scored:
    """Everything the roles compute for a rollout before rewards. The sampler's own log-probs
    are π_old on these tokens (`reuse_logprobs`): no second actor forward. Without a reference
    (kl.coef = 0) the KL is zero; without a critic (a critic-free advantage) the values are.
    Each role's forward runs in pieces of its `forwards` (`role_forwards`), so the phase's
    peak memory is that of one micro-batch, not of the rollout batch."""
    # Reward functions and a reward service run meanwhile (worker processes, a socket).
    pending = rewards.start(rollout, prompts.texts, prompts.fields)
    reuse = reuse_logprobs and rollout.logprobs is not None
    logprobs = rollout.logprobs if reuse else actor.logprobs(rollout)
    ref_logprobs = reference.logprobs(rollout) if reference is not None else logprobs.clone()
    values = critic.values(rollout) if critic is not None else torch.zeros_like(logprobs)
    mixed, sources = pending.result()
    return Scored(rollout, logprobs, ref_logprobs, values, mixed, sources)


def role_forwards(cfg: PPOConfig) -> RoleForwards:
    """How every PPO role forwards a rollout: its scoring forwards in pieces of
    ppo.micro_batch_size answers, cut between groups of answers to one prompt where that fits,
    and every forward padding-free with ppo.padding_free (the roles' builders in
    rlhf/roles/build.py serve other callers too and leave it whole and padded)."""
    return RoleForwards(cfg.ppo.micro_batch_size, cfg.rollout.n_samples_per_prompt, cfg.ppo.padding_free)


class LocalRoles:
    def __init__(self, cfg: PPOConfig, strategy: Strategy, tokenizer):
        """The roles the config needs: no critic for a critic-free advantage, no reference at
        kl.coef = 0, no reward model when rewards come from code alone (none is built or
        loaded)."""
        self.cfg, self.strategy = cfg, strategy
        self.pad_token_id = tokenizer.pad_token_id
        self.group = cfg.rollout.n_samples_per_prompt
        self.reference = build_reference(cfg, strategy) if cfg.uses_reference else None
        self.reward_model = build_reward_model(cfg, strategy) if cfg.uses_reward_model else None
        self.rewards = RewardSources(cfg.reward, self.reward_model, tokenizer)
        self.critic = build_critic(cfg, strategy) if cfg.uses_critic else None
        self.actor = build_actor(cfg, strategy, tokenizer)
        for role in (self.actor, self.critic, self.reference, self.reward_model):
            if role is not None:
                role.forwards = role_forwards(cfg)
        self.nodes = None  # all the roles live in this process

    def generate(self, prompts: Sequence[list[int]], params: SamplingParams, seed: int) -> Rollout:
        """This worker's prompts rolled out: global prompts rank, rank + W, ..., each repeated
        for its group of n answers, every answer from its own random stream."""
        world_size = self.strategy.world_size
        ids = local_rows(len(prompts), self.strategy.rank, world_size, self.group).tolist()
        return self.actor.generate(list(prompts), params, seed=seed, sample_ids=ids,
                                   sample_count=len(prompts) * world_size)

    def score(self, rollout: Rollout, prompts: PromptBatch) -> Scored:
        """This worker's rollout scored, joined with every other worker's into the global batch."""
        scored = score(rollout, self.actor, self.reference, self.critic, self.rewards, prompts,
                       self.cfg.rollout.reuse_logprobs)
        return gather_scored(scored, self.strategy, self.pad_token_id, self.group)

    def update(self, experience: Experience, orders: Sequence[torch.Tensor], kl_coef: float, train_actor: bool,
               step_offset: int) -> dict[str, float]:
        """PPO epochs over the global mini-batches of `orders`: critic always (when there is
        one), actor after the warm-up; metrics over every worker."""
        metrics = self.critic.update(experience, orders) if self.critic is not None else {}
        if train_actor:
            metrics.update(self.actor.update(experience, orders, kl_coef, step_offset))
        return metrics

    def trained(self) -> dict[str, TrainedModel]:
        return {"actor": self.actor.trained, **({"critic": self.critic.trained} if self.critic is not None else {})}

    @property
    def policy(self) -> TrainedModel:
        return self.actor.trained

    def models(self) -> list[torch.nn.Module]:
        """For the FLOP counter behind perf/mfu."""
        return [self.actor.trained.module] + [role.trained.module for role in (self.critic,) if role is not None] + [
            role.model for role in (self.reference, self.reward_model) if role is not None]

    def shutdown(self) -> None:
        """The reward functions' worker processes; the models go with the process."""
        self.rewards.shutdown()
