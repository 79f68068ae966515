"""The four PPO roles as the PPO loop sees them.

`LocalRoles` holds all four in this process and trains through its Strategy (one process,
or one SPMD worker among many under torchrun / Ray). rlhf/ray/ppo_roles.py gives the same
shape with each role a Ray actor group. The loop calls only what is here: `actor.generate`,
the scoring forwards (`actor.logprobs`, `reference.logprobs`, `critic.values`,
`reward_model.scores`), `update`, and `trained()` for checkpoints and export.
"""

from __future__ import annotations

from typing import Sequence

import torch

from rlhf.config import PPOConfig
from rlhf.distributed.strategy import Strategy, TrainedModel
from rlhf.roles.build import (
    build_actor,
    build_critic,
    build_reference,
    build_reward_model,
    ptx_batch_fn,
)
from rlhf.rollout.types import Experience
from rlhf.training.ppo import actor_update, critic_update


class LocalRoles:
    def __init__(self, cfg: PPOConfig, strategy: Strategy, tokenizer):
        self.cfg, self.strategy = cfg, strategy
        self.reference = build_reference(cfg, strategy)
        self.reward_model = build_reward_model(cfg, strategy)
        self.critic = build_critic(cfg, strategy)
        self.actor = build_actor(cfg, strategy, tokenizer)
        self.ptx_batch = ptx_batch_fn(cfg, tokenizer)

    def local_batch_size(self, size: int) -> int:
        """Samples each training worker holds of an experience batch of `size` rows (here: all)."""
        return size

    def update(self, experience: Experience, orders: Sequence[torch.Tensor], kl_coef: float, train_actor: bool,
               step_offset: int) -> dict[str, float]:
        """PPO epochs over mini-batches in `orders`: critic always, actor after the warm-up."""
        metrics = critic_update(experience, self.critic, self.strategy, self.cfg, orders)
        if train_actor:
            metrics.update(actor_update(experience, self.actor, self.strategy, self.cfg, kl_coef, orders,
                                        self.ptx_batch, step_offset))
        return metrics

    def trained(self) -> dict[str, TrainedModel]:
        return {"actor": self.actor.trained, "critic": self.critic.trained}

    def models(self) -> list[torch.nn.Module]:
        """For the FLOP counter behind perf/mfu."""
        return [self.actor.trained.module, self.critic.trained.module, self.reference.model, self.reward_model.model]
