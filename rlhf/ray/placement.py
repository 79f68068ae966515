"""Where the workers of a Ray group run: the bundles a placement group reserves, and each rank's
bundle, node, local rank and share of it. Pure arithmetic (group.py does the Ray calls), so
the tables are checked by hand for 1, 2 and 4 nodes x 8 GPUs.

Why one bundle per GPU worker: Ray hands out fractional GPUs best-fit. In one bundle holding a
node's 8 GPUs, 8 actor ranks and 8 reference ranks asking 0.5 GPU each put actor ranks 0 and 1
on GPU 0 (the fullest GPU that still fits), and NCCL refuses a communicator with two ranks on
one device. So on GPUs each worker slot is its own bundle of whole GPUs, and rank i of every
role of a colocation group (ppo.colocate) runs in bundle i: colocated roles share a slot's GPU
on purpose (actor rank i with reference rank i), and two ranks of one role, being in different
bundles, never share a device. A bundle of a fraction of a GPU would bring the best-fit
problem back between bundles, so `gpus_per_worker` is whole.

On CPUs there is no device to collide on: one bundle holds a node's workers (PACK on one node,
STRICT_SPREAD over several), as it always did.

Nodes: the slots of one node must land on one node, `workers_per_node` of them, so that local
ranks are true. On one node the slot bundles are STRICT_PACKed. Ray has no strategy that
spreads groups of bundles, so over several nodes the caller first lets Ray pick the nodes with
one bundle per node holding the node's totals (`node_bundles`, STRICT_SPREAD), then pins each
slot bundle to its node with a label selector (`label_selectors`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from rlhf.config_sections import gpu_share_problem
from rlhf.errors import UserError

NODE_ID_LABEL = "ray.io/node-id"
"""The label Ray gives every node (its node id); a bundle label selector on it pins a bundle."""

RESOURCE_STEP = 1e-4
"""Ray's resource precision: quantities are fixed-point in steps of 0.0001."""


@dataclass(frozen=True)
class RankSlot:
    """Where one rank of one worker group runs, and what it asks of its bundle."""

    rank: int
    node: int
    """The node's index among the group's `num_nodes` (bundle order), not a Ray node id."""
    local_rank: int
    bundle: int
    num_gpus: float
    num_cpus: float


@dataclass(frozen=True)
class BundleLayout:
    """The bundles of one placement group: `num_nodes x workers_per_node` worker slots, each
    slot `gpus_per_worker` GPUs and `cpus_per_worker` CPUs, shared by `roles_sharing` roles."""

    num_nodes: int
    workers_per_node: int
    gpus_per_worker: float
    cpus_per_worker: float
    roles_sharing: int = 1

    @property
    def workers(self) -> int:
        return self.num_nodes * self.workers_per_node

    @property
    def slot_bundles(self) -> bool:
        """One bundle per worker slot (GPUs), else one bundle per node (CPUs only)."""
        return self.gpus_per_worker > 0

    @property
    def pinned_to_nodes(self) -> bool:
        """Whether the slot bundles need node label selectors: slot bundles over several nodes."""
        return self.slot_bundles and self.num_nodes > 1

    @property
    def strategy(self) -> str:
        if self.slot_bundles:
            # Several nodes: the label selectors place every bundle; PACK only orders the search.
            return "STRICT_PACK" if self.num_nodes == 1 else "PACK"
        return "PACK" if self.num_nodes == 1 else "STRICT_SPREAD"

    def bundles(self) -> list[dict[str, float]]:
        if self.slot_bundles:
            return [{"CPU": self.cpus_per_worker, "GPU": self.gpus_per_worker} for _ in range(self.workers)]
        return [{"CPU": self.cpus_per_worker * self.workers_per_node} for _ in range(self.num_nodes)]

    def bundle_nodes(self) -> list[int]:
        """The node index of each bundle, in bundle order."""
        per_node = self.workers_per_node if self.slot_bundles else 1
        return [node for node in range(self.num_nodes) for _ in range(per_node)]

    def node_bundles(self) -> list[dict[str, float]]:
        """One bundle per node with that node's totals: reserved STRICT_SPREAD first so that
        Ray picks `num_nodes` nodes with room for their slots."""
        totals = {"CPU": self.cpus_per_worker * self.workers_per_node}
        if self.gpus_per_worker:
            totals["GPU"] = self.gpus_per_worker * self.workers_per_node
        return [dict(totals) for _ in range(self.num_nodes)]

    def label_selectors(self, node_ids: Sequence[str]) -> list[dict[str, str]]:
        """Pin bundle b to the Ray node `node_ids[node of b]` (the nodes the node bundles got)."""
        if len(node_ids) != self.num_nodes:
            raise ValueError(f"{len(node_ids)} node ids for {self.num_nodes} nodes")
        return [{NODE_ID_LABEL: node_ids[node]} for node in self.bundle_nodes()]

    def slots(self, share: float = 1.0) -> list[RankSlot]:
        """Rank by rank, where a group that gets `share` of every slot runs (each of the
        `roles_sharing` roles of a colocation group gets 1 / roles_sharing)."""
        check_share(self.gpus_per_worker, share)
        gpus, cpus = _quantity(self.gpus_per_worker * share), _quantity(self.cpus_per_worker * share)
        slots = []
        for rank in range(self.workers):
            node, local_rank = divmod(rank, self.workers_per_node)
            bundle = rank if self.slot_bundles else node
            slots.append(RankSlot(rank, node, local_rank, bundle, gpus, cpus))
        return slots


def _quantity(value: float) -> float:
    """`value` rounded down to Ray's 0.0001 steps: k shares of 1/k then still fit in one unit
    (1/3 -> 0.3333; Ray refuses finer quantities)."""
    steps = math.floor(value / RESOURCE_STEP + 1e-6)
    return round(steps * RESOURCE_STEP, 4)


def check_share(gpus_per_worker: float, share: float) -> None:
    """Refuse GPU shares that Ray cannot place on distinct devices (a UserError, before anything
    is reserved): a slot holds whole GPUs, and a share of a slot of several GPUs is whole GPUs."""
    if not 0 < share <= 1:
        raise ValueError(f"share {share} must be in (0, 1]")
    problem = gpu_share_problem(gpus_per_worker, round(1 / share))
    if problem:
        raise UserError(problem)


def bundle_layout(num_nodes: int, workers_per_node: int, gpus_per_worker: float, cpus_per_worker: float,
                  roles_sharing: int = 1) -> BundleLayout:
    """The layout for one placement group, checked (UserError) before anything is reserved."""
    if num_nodes < 1 or workers_per_node < 1 or roles_sharing < 1:
        raise ValueError("num_nodes, workers_per_node and roles_sharing must be >= 1")
    if cpus_per_worker <= 0 or gpus_per_worker < 0:
        raise ValueError("cpus_per_worker must be > 0 and gpus_per_worker >= 0")
    check_share(gpus_per_worker, 1.0 / roles_sharing)
    return BundleLayout(num_nodes, workers_per_node, float(gpus_per_worker), float(cpus_per_worker), roles_sharing)


@dataclass(frozen=True)
class RolePlacement:
    """One role of a PPO run with role groups: its colocation group (one placement group each,
    in `ppo.colocate` order) and its ranks' slots in that group's bundles."""

    group: int
    slots: list[RankSlot]


def colocation_table(role_groups: Sequence[Sequence[str]], num_nodes: int, workers_per_node: int,
                     gpus_per_worker: float, cpus_per_worker: float) -> dict[str, RolePlacement]:
    """Every role's placement under `ppo.colocate=role_groups`, as RayRoles starts them
    (ppo_roles.place_role_groups): each colocation group reserves its own `bundle_layout`, and
    each of its roles takes 1 / len(group) of every slot."""
    table = {}
    for group, names in enumerate(role_groups):
        layout = bundle_layout(num_nodes, workers_per_node, gpus_per_worker, cpus_per_worker, len(names))
        for role in names:
            table[role] = RolePlacement(group, layout.slots(1.0 / len(names)))
    return table
