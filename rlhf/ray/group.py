"""A group of Ray actors of one plain class, placed `workers_per_node` per node.

Where each worker runs is rlhf/ray/placement.py's table: on GPUs one bundle per worker slot
(whole GPUs; Ray's best-fit would otherwise stack two ranks of one NCCL group on one device),
pinned node by node so local ranks are known before anything starts; on CPUs one bundle per
node holding that node's workers, STRICT_SPREAD over several nodes. Several groups can share
one placement group (colocated PPO roles): rank i of each takes its share of slot i. Calls fan
out to all workers and gather in rank order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from rlhf.config_sections import ResourcesConfig
from rlhf.errors import UserError
from rlhf.ray.placement import BundleLayout, bundle_layout


def cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def default_cpus_per_worker(workers_per_node: int) -> float:
    """An even share of the smallest live node's CPUs, at least one."""
    import ray

    cpus = [node["Resources"].get("CPU", 0) for node in ray.nodes() if node.get("Alive")]
    return max(1.0, float(int(min(cpus) // workers_per_node))) if cpus else 1.0


def _wait_placed(group: Any, name: str, what: str, timeout_s: float) -> None:
    """Wait for `group` to be placed, or free it and raise a UserError naming `what`."""
    import ray

    ready, _ = ray.wait([group.ready()], timeout=timeout_s)
    if not ready:
        ray.util.remove_placement_group(group)
        raise UserError(
            f"Ray could not place {name}: {what} within {timeout_s:.0f} s; the cluster has "
            f"{ray.available_resources()} free. Lower resources.* or add nodes")


def pick_nodes(layout: BundleLayout, name: str, timeout_s: float) -> list[str]:
    """Ray node ids of `layout.num_nodes` distinct nodes with room for their slots: Ray places
    one bundle of each node's totals STRICT_SPREAD; that probe is freed again at once, and the
    slot bundles are pinned to the nodes it got."""
    import ray
    from ray.util.placement_group import placement_group, placement_group_table

    bundles = layout.node_bundles()
    probe = placement_group(bundles, strategy="STRICT_SPREAD", name=f"{name}-nodes")
    _wait_placed(probe, name, f"{layout.num_nodes} node(s) x {bundles[0]}", timeout_s)
    try:
        where = placement_group_table(probe)["bundles_to_node_id"]
        return [where[index] for index in range(layout.num_nodes)]
    finally:
        ray.util.remove_placement_group(probe)


@dataclass
class Placement:
    """A placement group and the per-worker resources it was sized for."""

    group: Any
    resources: ResourcesConfig
    cpus_per_worker: float
    gpus_per_worker: float
    layout: BundleLayout

    @classmethod
    def reserve(cls, resources: ResourcesConfig, name: str, timeout_s: float = 120.0,
                groups_per_node: int = 1, roles_sharing: int = 1) -> "Placement":
        """`groups_per_node`: placement groups that will share each node (PPO colocation
        groups), which split the default CPU share between them. `roles_sharing`: worker
        groups that will share every slot (the roles of one colocation group); a GPU share
        Ray cannot place on distinct devices is refused here, before anything is reserved."""
        import ray
        from ray.util.placement_group import placement_group

        gpus = resources.gpus_per_worker
        if gpus is None:
            gpus = 1.0 if cluster_has_gpus() else 0.0
        cpus = resources.cpus_per_worker or default_cpus_per_worker(resources.workers_per_node * groups_per_node)
        layout = bundle_layout(resources.num_nodes, resources.workers_per_node, gpus, cpus, roles_sharing)
        selectors = layout.label_selectors(pick_nodes(layout, name, timeout_s)) if layout.pinned_to_nodes else None
        bundles = layout.bundles()
        group = placement_group(bundles, strategy=layout.strategy, name=name, bundle_label_selector=selectors)
        per_node = len(bundles) // resources.num_nodes
        _wait_placed(group, name, f"{resources.num_nodes} node(s) x {per_node} x {bundles[0]}", timeout_s)
        return cls(group, resources, cpus, gpus, layout)

    def release(self) -> None:
        import ray

        ray.util.remove_placement_group(self.group)


class WorkerGroup:
    """`resources.workers` actors of `cls`, built with `make_args(rank, local_rank)`; rank i
    takes `share` of the placement's slot i (placement.py)."""

    def __init__(self, cls: type, placement: Placement, make_args: Callable[[int, int], tuple], name: str,
                 share: float = 1.0):
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.name = name
        remote_cls = ray.remote(cls)
        self.workers = []
        for slot in placement.layout.slots(share):
            options = {
                "num_cpus": slot.num_cpus,
                "num_gpus": slot.num_gpus,
                "name": f"{name}-{slot.rank}",
                "max_concurrency": 2,  # a status query may run beside a long call
                "scheduling_strategy": PlacementGroupSchedulingStrategy(
                    placement_group=placement.group, placement_group_bundle_index=slot.bundle),
            }
            self.workers.append(remote_cls.options(**options).remote(*make_args(slot.rank, slot.local_rank)))

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
