"""The four PPO roles as the PPO loop sees them.

`LocalRoles` holds all four in this process and trains through its Strategy (one process, or
one SPMD worker among many under torchrun / Ray). rlhf/ray/ppo_roles.py gives the same shape
with each role a Ray actor group. The loop calls only what is here: `generate` (this process's
share of the prompts), `score` (the global batch, scored), `update`, `trained()` for
checkpoints, `policy` for the export, `models()` for the FLOP counter and `shutdown()`.
"""

from __future__ import annotations

from typing import Sequence

import torch

from rlhf.config import PPOConfig
from rlhf.distributed.strategy import Strategy, TrainedModel
from rlhf.roles.build import build_actor, build_critic, build_reference, build_reward_model
from rlhf.roles.roles import Actor, Critic, Reference, RewardModel
from rlhf.rollout.engine import SamplingParams
from rlhf.rollout.gather import gather_scored, local_rows
from rlhf.rollout.types import Experience, Rollout, Scored


def score(rollout: Rollout, actor: Actor, reference: Reference, critic: Critic, reward_model: RewardModel,
          reuse_logprobs: bool) -> Scored:
    """Everything the roles compute for a rollout before rewards. The sampler's own log-probs
    are π_old on these tokens (`reuse_logprobs`): no second actor forward."""
    reuse = reuse_logprobs and rollout.logprobs is not None
    return Scored(rollout, rollout.logprobs if reuse else actor.logprobs(rollout), reference.logprobs(rollout),
                  critic.values(rollout), reward_model.scores(rollout))


class LocalRoles:
    def __init__(self, cfg: PPOConfig, strategy: Strategy, tokenizer):
        self.cfg, self.strategy = cfg, strategy
        self.pad_token_id = tokenizer.pad_token_id
        self.reference = build_reference(cfg, strategy)
        self.reward_model = build_reward_model(cfg, strategy)
        self.critic = build_critic(cfg, strategy)
        self.actor = build_actor(cfg, strategy, tokenizer)
        self.nodes = None  # all four live in this process

    def generate(self, prompts: Sequence[list[int]], params: SamplingParams, seed: int) -> Rollout:
        """This worker's prompts (global samples rank, rank + W, ...) rolled out."""
        world_size = self.strategy.world_size
        ids = local_rows(len(prompts), self.strategy.rank, world_size).tolist()
        return self.actor.generate(list(prompts), params, seed=seed, sample_ids=ids,
                                   sample_count=len(prompts) * world_size)

    def score(self, rollout: Rollout) -> Scored:
        """This worker's rollout scored, joined with every other worker's into the global batch."""
        scored = score(rollout, self.actor, self.reference, self.critic, self.reward_model, self.cfg.rollout.reuse_logprobs)
        return gather_scored(scored, self.strategy, self.pad_token_id)

    def update(self, experience: Experience, orders: Sequence[torch.Tensor], kl_coef: float, train_actor: bool,
               step_offset: int) -> dict[str, float]:
        """PPO epochs over the global mini-batches of `orders`: critic always, actor after the
        warm-up; metrics over every worker."""
        metrics = self.critic.update(experience, orders)
        if train_actor:
            metrics.update(self.actor.update(experience, orders, kl_coef, step_offset))
        return metrics

    def trained(self) -> dict[str, TrainedModel]:
        return {"actor": self.actor.trained, "critic": self.critic.trained}

    @property
    def policy(self) -> TrainedModel:
        return self.actor.trained

    def models(self) -> list[torch.nn.Module]:
        """For the FLOP counter behind perf/mfu."""
        return [self.actor.trained.module, self.critic.trained.module, self.reference.model, self.reward_model.model]

    def shutdown(self) -> None:
        """Nothing to release: the models go with the process."""
