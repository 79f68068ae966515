"""PPO with each role a Ray actor group (`ppo.colocate` a list of groups).

Roles named in one colocation group share one placement group: every role gets its share of
each bundle, so e.g. [[actor, reference], [critic, reward]] puts the policy and its frozen
copy on the same GPUs and the two scalar models on others. The driver runs the same loop as
a single process (stages/ppo.py) through proxies with the `LocalRoles` shape: a call splits
its batch over the role's workers by rows, runs them in parallel and joins the results.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch

from rlhf.config import PPOConfig
from rlhf.config_sections import StrategyConfig
from rlhf.distributed.single import SingleStrategy
from rlhf.distributed.strategy import seed_everything
from rlhf.ray.group import Placement, WorkerGroup, gather
from rlhf.ray.role_worker import RoleWorker
from rlhf.rollout.engine import SamplingParams, concat_rollouts
from rlhf.rollout.types import Experience, Rollout


def row_slices(rows: int, parts: int) -> list[slice]:
    """`parts` contiguous, near-equal slices of `rows` rows (the first ones one longer)."""
    base, extra = divmod(rows, parts)
    slices, start = [], 0
    for part in range(parts):
        stop = start + base + (1 if part < extra else 0)
        slices.append(slice(start, stop))
        start = stop
    return slices


class RoleGroup:
    """A role's workers behind the interface of the plain role class."""

    def __init__(self, group: WorkerGroup, pad_token_id: int):
        self.group = group
        self.pad_token_id = pad_token_id

    def _split_rollout(self, rollout: Rollout) -> list[Rollout]:
        return [rollout.select(torch.arange(s.start, s.stop)) for s in row_slices(len(rollout.sequences), len(self.group))]

    def generate(self, prompts: Sequence[list[int]], params: SamplingParams, seed: int) -> Rollout:
        refs = [worker.generate.remote(list(prompts[s]), params, seed + rank) for rank, (worker, s) in
                enumerate(zip(self.group.workers, row_slices(len(prompts), len(self.group))))]
        return concat_rollouts(gather(refs, self.group.name), self.pad_token_id)

    def _rows(self, method: str, rollout: Rollout) -> torch.Tensor:
        shards = self._split_rollout(rollout)
        return torch.cat(gather(self.group.scatter_async(method, shards), self.group.name))

    def logprobs(self, rollout: Rollout) -> torch.Tensor:
        return self._rows("logprobs", rollout)

    def values(self, rollout: Rollout) -> torch.Tensor:
        return self._rows("values", rollout)

    def scores(self, rollout: Rollout) -> torch.Tensor:
        return self._rows("scores", rollout)

    def update_async(self, experience: Experience, orders: Sequence[torch.Tensor], kl_coef: float,
                     step_offset: int) -> list:
        shards = [experience.select(torch.arange(s.start, s.stop))
                  for s in row_slices(len(experience.rollout.sequences), len(self.group))]
        return self.group.scatter_async("update", shards, orders, kl_coef, step_offset)

    def save_state(self, directory: Path) -> None:
        self.group.call("save_state", str(directory))

    def load_state(self, directory: Path) -> None:
        self.group.call("load_state", str(directory))

    def export(self, directory: Path, extra_files: dict | None = None) -> None:
        self.group.call("export", str(directory), extra_files)


class RayRoles:
    """The four roles as Ray actor groups, placed by `ppo.colocate`."""

    def __init__(self, cfg: PPOConfig, pad_token_id: int):
        self.cfg = cfg
        self.placements: list[Placement] = []
        self.groups: dict[str, WorkerGroup] = {}
        try:
            self._start(cfg)
        except BaseException:
            self.shutdown()  # a worker that died while starting: free what was placed
            raise
        self.nodes = {role: self.groups[role].call("node_id") for role in self.groups}
        self.actor = RoleGroup(self.groups["actor"], pad_token_id)
        self.critic = RoleGroup(self.groups["critic"], pad_token_id)
        self.reference = RoleGroup(self.groups["reference"], pad_token_id)
        self.reward_model = RoleGroup(self.groups["reward"], pad_token_id)

    def _start(self, cfg: PPOConfig) -> None:
        resources = cfg.resources
        cwd = os.getcwd()
        role_groups = cfg.ppo.role_groups()
        for names in role_groups:
            placement = Placement.reserve(resources, f"rlhf-ppo-{'-'.join(names)}", groups_per_node=len(role_groups))
            self.placements.append(placement)
            for role in names:
                self.groups[role] = WorkerGroup(
                    RoleWorker, placement,
                    lambda rank, local, role=role: (role, cfg, rank, resources.workers, local,
                                                    resources.workers_per_node, cwd),
                    name=f"ppo-{role}", share=1.0 / len(names))
        # Each trained role is its own process group; rank 0 of each hosts it.
        addresses = {role: gather([group.workers[0].rendezvous.remote()], group.name)[0]
                     for role, group in self.groups.items()}
        for role, group in self.groups.items():
            gather(group.call_async("setup", *addresses[role]), group.name)

    def local_batch_size(self, size: int) -> int:
        return size // len(self.actor.group)

    def update(self, experience: Experience, orders: Sequence[torch.Tensor], kl_coef: float, train_actor: bool,
               step_offset: int) -> dict[str, float]:
        """Actor and critic groups train on their shards of the experience at the same time."""
        critic_refs = self.critic.update_async(experience, orders, kl_coef, step_offset)
        actor_refs = self.actor.update_async(experience, orders, kl_coef, step_offset) if train_actor else []
        metrics = gather(critic_refs, "ppo-critic")[0]
        if actor_refs:
            metrics.update(gather(actor_refs, "ppo-actor")[0])
        return metrics

    def trained(self) -> dict[str, RoleGroup]:
        return {"actor": self.actor, "critic": self.critic}

    def models(self) -> list[torch.nn.Module]:
        return []  # the models live in the workers: no perf/mfu from the driver

    def shutdown(self) -> None:
        """Kill every role's workers (a dead one's peers may wait in a collective) and free
        the placement groups."""
        for group in self.groups.values():
            group.kill()
        for placement in self.placements:
            placement.release()


class DriverStrategy(SingleStrategy):
    """The driver's side of the Strategy contract when the roles are Ray groups: the loop runs
    here as a world of one on the CPU; saving, loading and export go to the role groups."""

    def __init__(self, cfg: PPOConfig):
        super().__init__(StrategyConfig(name="single"))
        # The checkpoint's resume check compares this name: it carries the groups' layout,
        # since the driver itself is a world of one.
        self.name = f"{cfg.strategy.name}+roles:{cfg.ppo.role_groups()}x{cfg.resources.workers}"

    def setup(self, seed: int) -> None:
        self.device = torch.device("cpu")
        seed_everything(seed)

    def save_state(self, model: RoleGroup, directory: Path) -> None:
        model.save_state(directory)

    def load_state(self, model: RoleGroup, directory: Path) -> None:
        model.load_state(directory)

    def export(self, model: RoleGroup, tokenizer: Any, directory: Path, extra_files: dict | None = None) -> None:
        model.export(directory, extra_files)

    def unwrap(self, model: Any) -> Any:
        return None  # the actor lives in its workers


def run_ppo_with_role_groups(cfg: PPOConfig) -> dict:
    from rlhf.models.loading import load_tokenizer
    from stages import ppo

    roles = RayRoles(cfg, load_tokenizer(cfg.model).pad_token_id)
    try:
        result = ppo.main(cfg, roles=roles, strategy=DriverStrategy(cfg))
    finally:
        roles.shutdown()
    return {"metrics": dict(result.metrics), "model_dir": str(result.model_dir), "nodes": roles.nodes}
