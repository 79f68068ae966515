"""Driven by test_placement.py inside a loopback namespace: a Ray cluster of two nodes with 4
fake GPUs each (ray.cluster_utils.Cluster with `num_gpus` declared; nothing touches a GPU).
The PPO role groups start through the code RayRoles uses (ppo_roles.place_role_groups) with a
probe in place of the role worker, and each probe reports its node, its GPU ids and its local
rank. Writes the reports as JSON."""

import json
import sys

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rlhf.config_sections import ResourcesConfig
from rlhf.ray.group import Placement, WorkerGroup
from rlhf.ray.ppo_roles import place_role_groups


class Probe:
    def __init__(self, role: str, rank: int, local_rank: int):
        self.role, self.rank, self.local_rank = role, rank, local_rank

    def report(self) -> dict:
        return {"role": self.role, "rank": self.rank, "local_rank": self.local_rank,
                "node": ray.get_runtime_context().get_node_id(), "gpus": [str(g) for g in ray.get_gpu_ids()]}


def start(role_groups: list[list[str]], resources: ResourcesConfig) -> list[dict]:
    placements: list[Placement] = []
    groups: dict[str, WorkerGroup] = {}
    try:
        place_role_groups(role_groups, resources, Probe, lambda role, rank, local: (role, rank, local),
                          placements, groups)
        return [report for group in groups.values() for report in group.call("report")]
    finally:
        for group in groups.values():
            group.kill()
        for placement in placements:
            placement.release()


def one_node_bundle() -> list[list[str]]:
    """The layout before slot bundles: one bundle of a node's 2 GPUs, two actors asking 0.5."""
    group = placement_group([{"CPU": 1, "GPU": 2}], strategy="PACK")
    ray.get(group.ready(), timeout=60)
    strategy = PlacementGroupSchedulingStrategy(placement_group=group, placement_group_bundle_index=0)
    remote = ray.remote(Probe).options(num_cpus=0.5, num_gpus=0.5, scheduling_strategy=strategy)
    probes = [remote.remote("actor", rank, rank) for rank in range(2)]
    try:
        return [report["gpus"] for report in ray.get([probe.report.remote() for probe in probes], timeout=120)]
    finally:
        for probe in probes:
            ray.kill(probe)
        remove_placement_group(group)


def main(out_path: str) -> None:
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 4, "num_gpus": 4, "include_dashboard": False})
    cluster.add_node(num_cpus=4, num_gpus=4)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    try:
        out = {
            "two_nodes": start([["actor", "reference"], ["critic", "reward"]],
                               ResourcesConfig(num_nodes=2, workers_per_node=2, cpus_per_worker=1.0)),
            "one_node": start([["actor", "reference"]], ResourcesConfig(num_nodes=1, workers_per_node=2,
                                                                        cpus_per_worker=1.0)),
            "node_bundle": one_node_bundle(),
        }
    finally:
        ray.shutdown()
        cluster.shutdown()
    with open(out_path, "w") as handle:
        json.dump(out, handle)


if __name__ == "__main__":
    main(sys.argv[1])
