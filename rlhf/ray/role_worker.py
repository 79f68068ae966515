"""One process of one PPO role, as a plain class (Ray runs it as an actor; tests can call it
directly). Trained roles (actor, critic) form a torch.distributed group with the other
workers of their role; frozen roles (reference, reward) only pick their device.

Tensors cross process boundaries on the CPU: token ids, masks, log-probs, values, scores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from rlhf.config import PPOConfig
from rlhf.config_sections import StrategyConfig
from rlhf.distributed.strategy import build_strategy
from rlhf.models.loading import load_tokenizer
from rlhf.ray.stage_worker import WorkerBase
from rlhf.roles.build import (
    build_actor,
    build_critic,
    build_reference,
    build_reward_model,
    ptx_batch_fn,
)
from rlhf.rollout.engine import SamplingParams
from rlhf.rollout.types import Experience, Rollout
from rlhf.training.ppo import actor_update, critic_update


class RoleWorker(WorkerBase):
    def __init__(self, role: str, cfg: PPOConfig, rank: int, world_size: int, local_rank: int,
                 local_world_size: int, cwd: str):
        super().__init__(rank, world_size, local_rank, local_world_size, cwd)
        self.role, self.cfg = role, cfg

    def setup(self, master_addr: str, master_port: int) -> None:
        """Join the role's process group (trained roles) and build the role's model."""
        cfg = self.cfg
        trained = self.role in ("actor", "critic")
        if trained:
            self.export_launch_env(master_addr, master_port)
        self.strategy = build_strategy(cfg.strategy if trained else StrategyConfig(name="single"))
        self.strategy.setup(cfg.seed)
        self.tokenizer = load_tokenizer(cfg.model)
        if self.role == "actor":
            self.model = build_actor(cfg, self.strategy, self.tokenizer)
            self.ptx_batch = ptx_batch_fn(cfg, self.tokenizer)
        elif self.role == "critic":
            self.model = build_critic(cfg, self.strategy)
        elif self.role == "reference":
            self.model = build_reference(cfg, self.strategy)
        else:
            self.model = build_reward_model(cfg, self.strategy)

    # -- forwards ------------------------------------------------------------------------
    def generate(self, prompts: Sequence[list[int]], params: SamplingParams, seed: int) -> Rollout:
        return self.model.generate(list(prompts), params, seed=seed).to(torch.device("cpu"))

    def logprobs(self, rollout: Rollout) -> torch.Tensor:
        return self.model.logprobs(rollout.to(self.strategy.device)).cpu()

    def values(self, rollout: Rollout) -> torch.Tensor:
        return self.model.values(rollout.to(self.strategy.device)).cpu()

    def scores(self, rollout: Rollout) -> torch.Tensor:
        return self.model.scores(rollout.to(self.strategy.device)).cpu()

    # -- training ------------------------------------------------------------------------
    def update(self, experience: Experience, orders: Sequence[torch.Tensor], kl_coef: float,
               step_offset: int) -> dict[str, float]:
        experience = experience.to(self.strategy.device)
        if self.role == "actor":
            metrics = actor_update(experience, self.model, self.strategy, self.cfg, kl_coef, orders,
                                   self.ptx_batch, step_offset)
        else:
            metrics = critic_update(experience, self.model, self.strategy, self.cfg, orders)
        return self.strategy.all_reduce(metrics)

    def save_state(self, directory: str) -> None:
        self.strategy.save_state(self.model.trained, Path(directory))

    def load_state(self, directory: str) -> None:
        self.strategy.load_state(self.model.trained, Path(directory))

    def export(self, directory: str, extra_files: dict | None = None) -> None:
        self.strategy.export(self.model.trained, self.tokenizer, Path(directory), extra_files=extra_files)

    def teardown(self) -> None:
        self.strategy.teardown()
