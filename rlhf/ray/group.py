"""A group of Ray actors of one plain class, placed `workers_per_node` per node.

The placement group has one bundle per node holding that node's workers, so local ranks are
known before anything starts and a multi-node group is spread with STRICT_SPREAD. Several
groups can share one placement group (colocated PPO roles): each then asks for its share of
every bundle. Calls fan out to all workers and gather in rank order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from rlhf.config_sections import ResourcesConfig
from rlhf.errors import UserError


def cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def default_cpus_per_worker(workers_per_node: int) -> float:
    """An even share of the smallest live node's CPUs, at least one."""
    import ray

    cpus = [node["Resources"].get("CPU", 0) for node in ray.nodes() if node.get("Alive")]
    return max(1.0, float(int(min(cpus) // workers_per_node))) if cpus else 1.0



@dataclass
class Placement:
    """A placement group and the per-worker resources it was sized for."""

    group: Any
    resources: ResourcesConfig
    cpus_per_worker: float
    gpus_per_worker: float

    @classmethod
    def reserve(cls, resources: ResourcesConfig, name: str, timeout_s: float = 120.0,
                groups_per_node: int = 1) -> "Placement":
        """`groups_per_node`: placement groups that will share each node (PPO colocation
        groups), which split the default CPU share between them."""
        import ray
        from ray.util.placement_group import placement_group

        gpus = resources.gpus_per_worker
        if gpus is None:
            gpus = 1.0 if cluster_has_gpus() else 0.0
        cpus = resources.cpus_per_worker or default_cpus_per_worker(resources.workers_per_node * groups_per_node)
        bundle = {"CPU": cpus * resources.workers_per_node}
        if gpus:
            bundle["GPU"] = gpus * resources.workers_per_node
        strategy = "STRICT_SPREAD" if resources.num_nodes > 1 else "PACK"
        group = placement_group([dict(bundle) for _ in range(resources.num_nodes)], strategy=strategy, name=name)
        ready, _ = ray.wait([group.ready()], timeout=timeout_s)
        if not ready:
            ray.util.remove_placement_group(group)
            raise UserError(
                f"Ray could not place {name}: {resources.num_nodes} node(s) x {bundle} within {timeout_s:.0f} s; the "
                f"cluster has {ray.available_resources()} free. Lower resources.* or add nodes")
        return cls(group, resources, cpus, gpus)

    def release(self) -> None:
        import ray

        ray.util.remove_placement_group(self.group)


class WorkerGroup:
    """`resources.workers` actors of `cls`, built with `make_args(rank, local_rank)`."""

    def __init__(self, cls: type, placement: Placement, make_args: Callable[[int, int], tuple], name: str,
                 share: float = 1.0):
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.name = name
        res = placement.resources
        remote_cls = ray.remote(cls)
        self.workers = []
        for rank in range(res.workers):
            node, local_rank = divmod(rank, res.workers_per_node)
            options = {
                "num_cpus": placement.cpus_per_worker * share,
                "num_gpus": placement.gpus_per_worker * share,
                "name": f"{name}-{rank}",
                "max_concurrency": 2,  # a status query may run beside a long call
                "scheduling_strategy": PlacementGroupSchedulingStrategy(
                    placement_group=placement.group, placement_group_bundle_index=node),
            }
            self.workers.append(remote_cls.options(**options).remote(*make_args(rank, local_rank)))

    def __len__(self) -> int:
        return len(self.workers)

    def call_async(self, method: str, *args: Any, **kwargs: Any) -> list:
        """Start `method(*args)` on every worker; object refs in rank order."""
        return [getattr(w, method).remote(*args, **kwargs) for w in self.workers]

    def call(self, method: str, *args: Any, **kwargs: Any) -> list:
        return gather(self.call_async(method, *args, **kwargs), self.name, relay_stop_to=self)

    def scatter_async(self, method: str, shards: Sequence[Any], *args: Any, **kwargs: Any) -> list:
        """Worker i gets `shards[i]` as its first argument."""
        return [getattr(w, method).remote(shard, *args, **kwargs) for w, shard in zip(self.workers, shards)]

    def kill(self) -> None:
        import ray

        for worker in self.workers:
            ray.kill(worker, no_restart=True)
        self.workers = []


class WorkerDied(RuntimeError):
    """A Ray worker of `role` died (killed, out of memory, node lost)."""

    def __init__(self, role: str, cause: str):
        self.role, self.cause = role, cause
        super().__init__(f"a {role} worker died: {cause}")


def gather(refs: list, name: str, relay_stop_to: "WorkerGroup | None" = None) -> list:
    """Results of `refs` in order. Returns as soon as one fails rather than after all finish:
    when a worker dies, the others wait in a collective that would never complete. A user
    mistake raised inside a worker comes back as a `UserError`, a dead worker as `WorkerDied`,
    a stop as `Interrupted`. A SIGTERM / Ctrl-C of the driver meanwhile is relayed to the
    workers of `relay_stop_to`, which checkpoint and stop."""
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    from rlhf.training.stop import STOP, Interrupted

    pending = list(refs)
    relayed = False
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=1.0)
            if done:
                ray.get(done)  # raises now if that worker failed
            if STOP.signal_name and relay_stop_to is not None and not relayed:
                for worker in relay_stop_to.workers:
                    worker.request_stop.remote(STOP.signal_name)
                relayed = True
        return ray.get(refs)
    except RayActorError as exc:
        raise WorkerDied(name, _first_line(exc)) from None
    except RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, Interrupted):
            raise Interrupted(str(cause), cause.signal_name) from None
        if isinstance(cause, UserError):
            raise UserError(str(cause)) from None
        if isinstance(cause, RayActorError):
            raise WorkerDied(name, _first_line(cause)) from None
        raise


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
