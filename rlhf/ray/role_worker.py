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
from rlhf.distributed.factory import build_strategy
from rlhf.distributed.precision import probe_shape
from rlhf.distributed.strategy import World
from rlhf.kernels import configure_process
from rlhf.models.loading import load_tokenizer
from rlhf.ray.stage_worker import WorkerBase, node_ip
from rlhf.roles.build import build_actor, build_critic, build_reference, build_reward_model
from rlhf.roles.team import role_forwards
from rlhf.rollout.engine import SamplingParams
from rlhf.rollout.types import Experience, Rollout


class RoleWorker(WorkerBase):
    def __init__(self, role: str, cfg: PPOConfig, rank: int, world_size: int, local_rank: int,
                 local_world_size: int, cwd: str):
        super().__init__(rank, world_size, local_rank, local_world_size, cwd)
        self.role, self.cfg = role, cfg

    def setup(self, master_addr: str, master_port: int) -> None:
        """Join the role's process group (trained roles) and build the role's model."""
        cfg = self.cfg
        configure_process(cfg.kernels)
        trained = self.role in ("actor", "critic")
        # A frozen role's workers form their own process group where the strategy shards
        # weights (ZeRO-3, FSDP2), so that the reference or reward model is sharded over them
        # rather than whole on each; elsewhere each worker scores with its own whole copy.
        joins = trained or (cfg.strategy.shards_weights and self.world_size > 1)
        if joins:
            self.export_launch_env(master_addr, master_port)
        self.world = build_strategy(cfg.strategy, probe_shape(cfg)) if joins else World()
        self.world.setup(cfg.seed)
        self.tokenizer = load_tokenizer(cfg.model)
        if self.role == "actor":
            self.model = build_actor(cfg, self.world, self.tokenizer)
        elif self.role == "critic":
            self.model = build_critic(cfg, self.world)
        elif self.role == "reference":
            self.model = build_reference(cfg, self.world)
        else:
            self.model = build_reward_model(cfg, self.world)
        # This worker's share of a rollout is scored in pieces of ppo.micro_batch_size, as LocalRoles does.
        self.model.forwards = role_forwards(cfg)

    # -- forwards ------------------------------------------------------------------------
    def generate(self, prompts: Sequence[list[int]], params: SamplingParams, seed: int | None,
                 sample_ids: Sequence[int], sample_count: int | None = None) -> Rollout:
        return self.model.generate(list(prompts), params, seed=seed, sample_ids=sample_ids,
                                   sample_count=sample_count).to(torch.device("cpu"))

    def logprobs(self, rollout: Rollout, temperature: float | None = None) -> torch.Tensor:
        return self.model.logprobs(rollout.to(self.world.device), temperature).cpu()

    def values(self, rollout: Rollout) -> torch.Tensor:
        return self.model.values(rollout.to(self.world.device)).cpu()

    def scores(self, rollout: Rollout) -> torch.Tensor:
        return self.model.scores(rollout.to(self.world.device)).cpu()

    # -- vLLM engine actors (rollout.vllm.placement=actors) ------------------------------
    def vllm_engine_spec(self) -> tuple[str, str]:
        """The policy's config.json text and the dtype its weights are sent in, for the driver
        to build engine actors of that shape and dtype."""
        from rlhf.rollout.vllm_actors import policy_config_json

        engine = self.model.engine
        return policy_config_json(engine.model), str(engine.dtype).removeprefix("torch.")

    def attach_engines(self, engines: list, workers_per_engine: int) -> None:
        """Sample with the engine actors; rank 0 forms the weight-sync group with them, its
        store on this node's address as Ray reports it."""
        self.model.engine.attach(engines, workers_per_engine, node_ip())

    # -- training ------------------------------------------------------------------------
    def update(self, experience: Experience, orders: Sequence[torch.Tensor], kl_coef: float,
               step_offset: int) -> dict[str, float]:
        """This worker's share of every global mini-batch; metrics over the role's workers."""
        return self.model.update(experience.to(self.world.device), orders, kl_coef, step_offset)

    def save_state(self, directory: str) -> None:
        self.model.trained.save_state(Path(directory))

    def load_state(self, directory: str) -> None:
        self.model.trained.load_state(Path(directory))

    def export(self, directory: str, extra_files: dict | None = None) -> None:
        self.model.trained.export(Path(directory), self.tokenizer, extra_files)

    def teardown(self) -> None:
        self.world.teardown()
