"""PPO with each role a Ray actor group (`ppo.colocate` a list of groups).

Roles named in one colocation group share one placement group: rank i of every role gets its
share of worker slot i (placement.py), so e.g. [[actor, reference], [critic, reward]] puts
actor rank i and reference rank i on one GPU, the two scalar models on others, and never two
ranks of one role on one GPU. The PPO loop (stages/ppo.py) runs on the driver, a world of
one, through `RayRoles`, which has the shape of `LocalRoles`: a call splits its batch over the
role's workers by rows, runs them in parallel and joins the results. Trained roles get the
whole experience and train on their worker's share of every global mini-batch, as SPMD
workers do.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from rlhf.config import PPOConfig
from rlhf.config_sections import ResourcesConfig
from rlhf.data.prompt_dataset import PromptBatch
from rlhf.distributed.strategy import Strategy, World
from rlhf.ray.group import Placement, WorkerGroup, gather
from rlhf.ray.role_worker import RoleWorker
from rlhf.roles.rewards import RewardSources
from rlhf.roles.team import LocalRoles, score
from rlhf.rollout.engine import SamplingParams, concat_rollouts, row_slices
from rlhf.rollout.types import Experience, Rollout, Scored


def uses_role_groups(cfg: PPOConfig) -> bool:
    """Whether PPO runs its loop on the driver with each role a Ray actor group."""
    return cfg.ray.enabled and cfg.ppo.role_groups() is not None


def ppo_world(cfg: PPOConfig) -> World | None:
    """The driver's world of one when the roles are Ray groups (named after their layout, which
    a checkpoint must match to resume); None: the configured strategy."""
    if not uses_role_groups(cfg):
        return None
    world = World()
    world.name = f"{cfg.strategy.name}+roles:{cfg.ppo.role_groups()}x{cfg.resources.workers}"
    return world


def build_ppo_roles(cfg: PPOConfig, world: World, tokenizer) -> "LocalRoles | RayRoles":
    """All four roles in this process (trained through `world`, a Strategy), or Ray groups."""
    if uses_role_groups(cfg):
        return RayRoles(cfg, tokenizer)
    assert isinstance(world, Strategy)
    return LocalRoles(cfg, world, tokenizer)


def place_role_groups(role_groups: Sequence[Sequence[str]], resources: ResourcesConfig, worker_cls: type,
                      make_args: Callable[[str, int, int], tuple], placements: list[Placement],
                      groups: dict[str, WorkerGroup]) -> None:
    """One placement group per colocation group, each of its roles a worker group taking an
    equal share of every slot: rank i of each role runs in slot i, so colocated roles share a
    slot's GPU on purpose and two ranks of one role never share one (placement.colocation_table
    is this layout). Appends to `placements` and `groups` as it goes, so that a caller can free
    what was started when a later step fails."""
    for names in role_groups:
        placement = Placement.reserve(resources, f"rlhf-ppo-{'-'.join(names)}", groups_per_node=len(role_groups),
                                      roles_sharing=len(names))
        placements.append(placement)
        for role in names:
            groups[role] = WorkerGroup(worker_cls, placement,
                                       lambda rank, local, role=role: make_args(role, rank, local),
                                       name=f"ppo-{role}", share=1.0 / len(names))


class RoleGroup:
    """A role's workers behind the interface of the plain role class; a trained role's group
    also saves, loads and exports like a `TrainedModel`."""

    def __init__(self, group: WorkerGroup, pad_token_id: int):
        self.group = group
        self.pad_token_id = pad_token_id

    def _slices(self, rows: int) -> list[slice]:
        return row_slices(rows, len(self.group))

    def generate(self, prompts: Sequence[list[int]], params: SamplingParams, seed: int | None = None,
                 sample_ids: Sequence[int] | None = None) -> Rollout:
        ids = list(range(len(prompts)) if sample_ids is None else sample_ids)
        count = max(ids) + 1 if ids else 0
        refs = [worker.generate.remote(list(prompts[s]), params, seed, ids[s], count)
                for worker, s in zip(self.group.workers, self._slices(len(prompts)))]
        return concat_rollouts(gather(refs, self.group.name), self.pad_token_id)

    def _rows(self, method: str, rollout: Rollout, *args: Any) -> torch.Tensor:
        """`method` over the rollout's rows, split near-equally over the workers (whole groups
        of answers to a prompt in training, whose rollout_batch_size is a multiple of the
        workers). Each worker scores its share in pieces of ppo.micro_batch_size (the role's
        `scoring`, set by RoleWorker.setup), so its peak memory does not grow with the batch."""
        shards = [rollout.select(torch.arange(s.start, s.stop)) for s in self._slices(len(rollout.sequences))]
        return torch.cat(gather(self.group.scatter_async(method, shards, *args), self.group.name))

    def logprobs(self, rollout: Rollout, temperature: float | None = None) -> torch.Tensor:
        return self._rows("logprobs", rollout, temperature)

    def values(self, rollout: Rollout) -> torch.Tensor:
        return self._rows("values", rollout)

    def scores(self, rollout: Rollout) -> torch.Tensor:
        return self._rows("scores", rollout)

    def update_async(self, experience: Experience, orders: Sequence[torch.Tensor], kl_coef: float,
                     step_offset: int) -> list:
        return self.group.call_async("update", experience, list(orders), kl_coef, step_offset)

    def save_state(self, directory: Path) -> None:
        self.group.call("save_state", str(directory))

    def load_state(self, directory: Path) -> None:
        self.group.call("load_state", str(directory))

    def export(self, directory: Path, tokenizer: Any = None, extra_files: dict | None = None) -> None:
        """The workers export (their tokenizer, rank 0 writes)."""
        self.group.call("export", str(directory), extra_files)


class RayRoles:
    def __init__(self, cfg: PPOConfig, tokenizer):
        self.cfg = cfg
        pad_token_id = self.pad_token_id = tokenizer.pad_token_id
        self.eos_token_id = tokenizer.eos_token_id
        self.engines = None
        """The vLLM engine actors (rollout.vllm.placement=actors), or None."""
        self.placements: list[Placement] = []
        self.groups: dict[str, WorkerGroup] = {}
        try:
            self._start(cfg)
        except BaseException:
            self.shutdown()  # a worker that died while starting: free what was placed
            raise
        self.nodes = {role: self.groups[role].call("node_id") for role in self.groups}
        group = lambda role: RoleGroup(self.groups[role], pad_token_id) if role in self.groups else None  # noqa: E731
        self.actor, self.critic = group("actor"), group("critic")
        self.reference, self.reward_model = group("reference"), group("reward")
        self.rewards = RewardSources(cfg.reward, self.reward_model, tokenizer)

    def _start(self, cfg: PPOConfig) -> None:
        resources = cfg.resources
        cwd = os.getcwd()
        role_groups = cfg.ppo.role_groups()
        needed = {"actor": True, "critic": cfg.uses_critic, "reference": cfg.uses_reference,
                  "reward": cfg.uses_reward_model}
        role_groups = [[role for role in names if needed[role]] for names in role_groups]
        role_groups = [names for names in role_groups if names]
        place_role_groups(role_groups, resources, RoleWorker,
                          lambda role, rank, local: (role, cfg, rank, resources.workers, local,
                                                     resources.workers_per_node, cwd),
                          self.placements, self.groups)
        # Each trained role is its own process group; rank 0 of each hosts it.
        addresses = {role: gather([group.workers[0].rendezvous.remote()], group.name)[0]
                     for role, group in self.groups.items()}
        for role, group in self.groups.items():
            gather(group.call_async("setup", *addresses[role]), group.name)
        if cfg.rollout.engine == "vllm" and cfg.rollout.vllm.placement == "actors":
            self._start_engines(cfg)

    def _start_engines(self, cfg: PPOConfig) -> None:
        """rollout.vllm.placement=actors: the vLLM engine actors, each on devices of its own,
        shaped and typed after the actor's policy (which rank 0 of the actor reports), then
        attached to every actor worker's engine (rank 0 forms the weight-sync group)."""
        from rlhf.ray.vllm_engines import cluster_has_gpus, start_engine_actors
        from rlhf.rollout.vllm_sampler import SamplerSettings

        vllm, actor = cfg.rollout.vllm, self.groups["actor"]
        model_config, dtype = gather([actor.workers[0].vllm_engine_spec.remote()], actor.name)[0]
        max_model_len = vllm.max_model_len or cfg.data.max_prompt_length + cfg.rollout.max_new_tokens
        kv_cache_gib = vllm.kv_cache_gib
        if kv_cache_gib is None and not cluster_has_gpus():
            import json
            from types import SimpleNamespace

            import torch

            from rlhf.rollout.vllm_kv import rollout_kv_cache_gib

            kv_cache_gib = rollout_kv_cache_gib(SimpleNamespace(**json.loads(model_config)), getattr(torch, dtype),
                                                cfg.rollout.batch_size, max_model_len)
        settings = SamplerSettings(
            dtype=dtype, seed=cfg.seed, gpu_memory_utilization=vllm.gpu_memory_utilization,
            max_model_len=max_model_len, kv_cache_gib=kv_cache_gib, tensor_parallel_size=vllm.tensor_parallel_size,
            enable_sleep_mode=False,
            enforce_eager=vllm.enforce_eager, load_format="dummy")
        self.engines = start_engine_actors(vllm.engines, settings, model_config, self.eos_token_id,
                                           cpus_per_engine=vllm.cpus_per_engine)
        gather(actor.call_async("attach_engines", self.engines.handles, self.engines.workers_per_engine), actor.name)

    def generate(self, prompts: Sequence[list[int]], params: SamplingParams, seed: int) -> Rollout:
        """The global batch rolled out over the actor's workers."""
        return self.actor.generate(prompts, params, seed=seed, sample_ids=range(len(prompts)))

    def score(self, rollout: Rollout, prompts: PromptBatch) -> Scored:
        """The global batch scored by every role's workers (reward functions and the reward
        service run here, on the driver)."""
        return score(rollout, self.actor, self.reference, self.critic, self.rewards, prompts,
                     self.cfg.rollout.reuse_logprobs)

    def update(self, experience: Experience, orders: Sequence[torch.Tensor], kl_coef: float, train_actor: bool,
               step_offset: int) -> dict[str, float]:
        """Actor and critic groups train on their shares of the experience at the same time."""
        critic_refs = self.critic.update_async(experience, orders, kl_coef, step_offset) if self.critic else []
        actor_refs = self.actor.update_async(experience, orders, kl_coef, step_offset) if train_actor else []
        metrics = gather(critic_refs, "ppo-critic")[0] if critic_refs else {}
        if actor_refs:
            metrics.update(gather(actor_refs, "ppo-actor")[0])
        return metrics

    def trained(self) -> dict[str, RoleGroup]:
        return {"actor": self.actor, **({"critic": self.critic} if self.critic is not None else {})}

    @property
    def policy(self) -> RoleGroup:
        return self.actor

    def models(self) -> list[torch.nn.Module]:
        return []  # the models live in the workers: no perf/mfu from the driver

    def shutdown(self) -> None:
        """Kill every role's workers (a dead one's peers may wait in a collective) and free
        the placement groups."""
        if getattr(self, "rewards", None) is not None:
            self.rewards.shutdown()
        if getattr(self, "engines", None) is not None:
            self.engines.kill()
            self.engines = None
        for group in self.groups.values():
            group.kill()
        for placement in self.placements:
            placement.release()
        self.groups, self.placements = {}, []
