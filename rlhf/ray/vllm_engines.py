"""The vLLM engine actors of rollout.vllm.placement=actors, each in a placement group of its own.

On GPUs an engine of tensor_parallel_size T reserves T bundles of one GPU each, packed on one
node (STRICT_PACK: its workers talk over NVLink/PCIe, never across nodes). With T = 1 the
actor itself takes the bundle's GPU and runs the engine in its process; with T > 1 the actor
takes no GPU and vLLM's Ray executor starts its T workers in the bundles (the actor's
scheduling strategy captures child tasks, and vLLM uses the placement group it runs in). On
CPUs an engine is one bundle of `cpus_per_engine` CPUs. Engines are placed apart from the
PPO roles' groups: they never share a device with a trainer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rlhf.errors import UserError
from rlhf.ray.group import _wait_placed, cluster_has_gpus
from rlhf.rollout.vllm_actors import EngineActor
from rlhf.rollout.vllm_sampler import SamplerSettings


@dataclass(frozen=True)
class EngineLayout:
    """What one engine reserves: its bundles and the actor's own share of the first."""

    bundles: list[dict[str, float]]
    actor_gpus: float
    actor_cpus: float
    executor: str | None
    """vLLM's distributed executor: "ray" where its workers are Ray actors (T > 1 on GPUs)."""


def engine_layout(tensor_parallel_size: int, on_gpus: bool, cpus_per_engine: float) -> EngineLayout:
    if tensor_parallel_size < 1 or cpus_per_engine <= 0:
        raise ValueError("tensor_parallel_size must be >= 1 and cpus_per_engine > 0")
    if not on_gpus:
        if tensor_parallel_size > 1:
            raise UserError(f"rollout.vllm.tensor_parallel_size={tensor_parallel_size} on a cluster without GPUs: "
                            "the CPU engine actors run one worker each; set it to 1")
        return EngineLayout([{"CPU": float(cpus_per_engine)}], 0.0, float(cpus_per_engine), None)
    bundles = [{"GPU": 1.0, "CPU": 1.0} for _ in range(tensor_parallel_size)]
    if tensor_parallel_size == 1:
        return EngineLayout(bundles, 1.0, 1.0, None)
    return EngineLayout(bundles, 0.0, 0.0, "ray")


@dataclass
class EngineActors:
    """The started engines (Ray actor handles) and the placement groups they hold."""

    handles: list[Any] = field(default_factory=list)
    groups: list[Any] = field(default_factory=list)
    workers_per_engine: int = 1

    def kill(self) -> None:
        import ray

        for handle in self.handles:
            ray.kill(handle, no_restart=True)
        for group in self.groups:
            ray.util.remove_placement_group(group)
        self.handles, self.groups = [], []


def start_engine_actors(count: int, settings: SamplerSettings, model_config: str, eos_token_id: int,
                        cpus_per_engine: float = 1.0, timeout_s: float = 120.0,
                        name: str = "rlhf-vllm") -> EngineActors:
    """`count` engines built from `settings` (seed + engine index each), ready to sample; on a
    failure the ones already started are freed before the error is raised."""
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    layout = engine_layout(settings.tensor_parallel_size, cluster_has_gpus(), cpus_per_engine)
    started = EngineActors(workers_per_engine=settings.tensor_parallel_size)
    remote_cls = ray.remote(EngineActor)
    try:
        for index in range(count):
            group = placement_group(layout.bundles, strategy="STRICT_PACK", name=f"{name}-{index}")
            started.groups.append(group)
            _wait_placed(group, f"{name}-{index}", f"one vLLM engine of {layout.bundles}", timeout_s)
            engine_settings = SamplerSettings(**{**vars(settings), "seed": settings.seed + index,
                                                 "distributed_executor_backend": layout.executor})
            options = {
                "num_cpus": layout.actor_cpus, "num_gpus": layout.actor_gpus, "name": f"{name}-{index}",
                "scheduling_strategy": PlacementGroupSchedulingStrategy(
                    placement_group=group, placement_group_bundle_index=0,
                    placement_group_capture_child_tasks=True),
            }
            started.handles.append(remote_cls.options(**options).remote(model_config, engine_settings, eos_token_id))
        # The constructors load vLLM; wait for all of them, so a failing one is reported here.
        ray.get([handle.__ray_ready__.remote() for handle in started.handles])
    except BaseException:
        started.kill()
        raise
    return started
