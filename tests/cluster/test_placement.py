"""Issue check: `ppo.colocate` role groups on GPUs never put two ranks of one role (one NCCL
group) on one GPU, and colocated roles share slots on purpose. The bundle arithmetic
(rlhf/ray/placement.py) by hand for 1, 2 and 4 nodes x 8 GPUs; then a Ray cluster of two
fake 4-GPU nodes (`num_gpus` declared, no GPU present) where each started worker reports its
node and GPU ids, compared with the table."""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from cluster.loopback import loopback_namespace_available, run_isolated
from rlhf.errors import UserError
from rlhf.ray.placement import RankSlot, bundle_layout, colocation_table

REPO = Path(__file__).resolve().parents[2]
SPLIT = [["actor", "reference"], ["critic", "reward"]]


def where(table) -> dict[tuple[str, int], tuple[int, int, int]]:
    """(role, rank) -> (colocation group, node index, bundle)."""
    return {(role, s.rank): (placed.group, s.node, s.bundle) for role, placed in table.items() for s in placed.slots}


def devices(table) -> set[frozenset]:
    """The ranks that share each GPU slot: one slot bundle is one device set."""
    shared = defaultdict(set)
    for key, (group, _, bundle) in where(table).items():
        shared[(group, bundle)].add(key)
    return {frozenset(ranks) for ranks in shared.values()}


# -- the tables, by hand ------------------------------------------------------------------------

def test_one_node_of_8_gpus_split_in_two_colocation_groups():
    # 1 node x 8 GPUs, [[actor, reference], [critic, reward]], 4 workers per role: each group
    # reserves 4 slot bundles of 1 GPU and 2 CPUs (8 GPUs in all); each role takes half of each.
    layout = bundle_layout(1, 4, 1, 2.0, roles_sharing=2)
    assert layout.bundles() == [{"CPU": 2.0, "GPU": 1.0}] * 4
    assert layout.strategy == "STRICT_PACK" and not layout.pinned_to_nodes
    assert layout.bundle_nodes() == [0, 0, 0, 0]
    table = colocation_table(SPLIT, 1, 4, 1, 2.0)
    for role, group in (("actor", 0), ("reference", 0), ("critic", 1), ("reward", 1)):
        assert table[role].group == group
        #                               rank node local bundle GPUs CPUs
        assert table[role].slots == [RankSlot(0, 0, 0, 0, 0.5, 1.0), RankSlot(1, 0, 1, 1, 0.5, 1.0),
                                     RankSlot(2, 0, 2, 2, 0.5, 1.0), RankSlot(3, 0, 3, 3, 0.5, 1.0)]
    # GPU slots: actor i with reference i in group 0's bundle i; critic i with reward i in group 1's.
    assert devices(table) == {frozenset({("actor", i), ("reference", i)}) for i in range(4)} | \
        {frozenset({("critic", i), ("reward", i)}) for i in range(4)}


def test_two_nodes_of_8_gpus_all_roles_on_every_gpu():
    # 2 nodes x 8 GPUs, one group of all four roles, 8 workers per node: 16 slot bundles, 8 pinned
    # to each node; each role takes a quarter GPU (and a quarter of 4 CPUs) of every slot.
    roles = ["actor", "reference", "critic", "reward"]
    layout = bundle_layout(2, 8, 1, 4.0, roles_sharing=4)
    assert layout.bundles() == [{"CPU": 4.0, "GPU": 1.0}] * 16
    assert layout.bundle_nodes() == [0] * 8 + [1] * 8
    assert layout.strategy == "PACK" and layout.pinned_to_nodes
    # Ray picks the nodes with one bundle of each node's totals, STRICT_SPREAD ...
    assert layout.node_bundles() == [{"CPU": 32.0, "GPU": 8.0}] * 2
    # ... and each slot bundle is pinned to its node's id.
    assert layout.label_selectors(["n0", "n1"]) == [{"ray.io/node-id": "n0"}] * 8 + [{"ray.io/node-id": "n1"}] * 8
    table = colocation_table([roles], 2, 8, 1, 4.0)
    for role in roles:
        slots = table[role].slots
        assert [(s.rank, s.node, s.local_rank, s.bundle) for s in slots] == \
            [(r, 0, r, r) for r in range(8)] + [(r, 1, r - 8, r) for r in range(8, 16)]
        assert {(s.num_gpus, s.num_cpus) for s in slots} == {(0.25, 1.0)}
    assert devices(table) == {frozenset((role, i) for role in roles) for i in range(16)}


def test_four_nodes_of_8_gpus_split_in_two_colocation_groups():
    # 4 nodes x 8 GPUs, [[actor, reference], [critic, reward]], 4 workers per node per role:
    # each group 16 slot bundles, 4 per node; both groups together fill the 32 GPUs.
    layout = bundle_layout(4, 4, 1, 1.0, roles_sharing=2)
    assert len(layout.bundles()) == 16 and layout.bundle_nodes() == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4
    assert layout.node_bundles() == [{"CPU": 4.0, "GPU": 4.0}] * 4
    table = colocation_table(SPLIT, 4, 4, 1, 1.0)
    actor = table["actor"].slots
    # rank 13 = node 3, local rank 1, bundle 13; half a GPU and half a CPU.
    assert actor[13] == RankSlot(13, 3, 1, 13, 0.5, 0.5)
    assert [(s.node, s.local_rank) for s in actor] == [(n, l) for n in range(4) for l in range(4)]
    assert where(table)[("reference", 13)] == (0, 3, 13) and where(table)[("reward", 13)] == (1, 3, 13)
    assert len(devices(table)) == 32 and all(len(ranks) == 2 for ranks in devices(table))


@pytest.mark.parametrize("nodes", [1, 2, 4])
def test_no_two_ranks_of_one_role_share_a_gpu_slot(nodes):
    # Layouts that fit 8-GPU nodes: (colocation groups, workers per node).
    for groups, per_node in ((SPLIT, 4), ([["actor", "reference", "critic", "reward"]], 8),
                             ([["actor"], ["critic"], ["reference", "reward"]], 2)):
        table = colocation_table(groups, nodes, per_node, 1, 1.0)
        for role, placed in table.items():
            assert len({s.bundle for s in placed.slots}) == len(placed.slots), (groups, role)
        # Per node, the GPUs asked never exceed the slots reserved there (a whole GPU each).
        for ranks in devices(table):
            assert sum(table[role].slots[rank].num_gpus for role, rank in ranks) <= 1.0


def test_three_roles_share_a_gpu_in_ray_steps_that_still_fit():
    # 1/3 GPU is 0.3333 in Ray's 0.0001 steps: three fit one GPU (0.9999), 0.33334 would not.
    slot = colocation_table([["actor", "reference", "reward"], ["critic"]], 1, 8, 1, 1.0)["reward"].slots[0]
    assert slot.num_gpus == 0.3333 and slot.num_cpus == 0.3333 and 3 * slot.num_gpus <= 1.0


def test_cpu_only_keeps_one_bundle_per_node():
    # gpus 0: no device to collide on; a bundle holds the node's workers, STRICT_SPREAD over nodes.
    layout = bundle_layout(2, 2, 0, 1.0, roles_sharing=2)
    assert layout.bundles() == [{"CPU": 2.0}, {"CPU": 2.0}] and layout.strategy == "STRICT_SPREAD"
    assert not layout.pinned_to_nodes and layout.bundle_nodes() == [0, 1]
    assert layout.slots(0.5) == [RankSlot(0, 0, 0, 0, 0.0, 0.5), RankSlot(1, 0, 1, 0, 0.0, 0.5),
                                 RankSlot(2, 1, 0, 1, 0.0, 0.5), RankSlot(3, 1, 1, 1, 0.0, 0.5)]
    assert bundle_layout(1, 2, 0, 1.0).strategy == "PACK" and bundle_layout(1, 2, 0, 1.0).bundles() == [{"CPU": 2.0}]


def test_two_gpus_per_worker_split_between_two_roles_as_whole_gpus():
    slots = colocation_table(SPLIT, 1, 2, 2, 1.0)["actor"].slots
    assert [(s.bundle, s.num_gpus) for s in slots] == [(0, 1.0), (1, 1.0)]


@pytest.mark.parametrize("gpus, groups, message", [
    (0.5, SPLIT, "takes whole GPUs"),
    (2, [["actor", "reference", "critic"], ["reward"]], "0.667 GPUs each"),
])
def test_gpu_shares_ray_cannot_place_on_distinct_devices_are_refused(gpus, groups, message):
    with pytest.raises(UserError, match=message):
        colocation_table(groups, 1, 4, gpus, 1.0)


# -- on a Ray cluster with fake GPUs ------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.skipif(not loopback_namespace_available(), reason="needs unshare -n (a loopback-only network namespace)")
def test_workers_land_on_the_gpus_the_table_says(tmp_path):
    done = run_isolated([sys.executable, str(Path(__file__).with_name("_placement_runs.py")), str(tmp_path / "out.json")],
                        timeout=600, env={"PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = json.loads((tmp_path / "out.json").read_text())

    def check(reports: list[dict], table) -> None:
        got = {(r["role"], r["rank"]): r for r in reports}
        assert set(got) == set(where(table))
        for (role, rank), report in got.items():
            assert len(report["gpus"]) == 1 and report["local_rank"] == table[role].slots[rank].local_rank
        # The NCCL rule: the ranks of one role are on distinct GPUs.
        for role in table:
            used = [(got[(role, r)]["node"], got[(role, r)]["gpus"][0]) for r in range(len(table[role].slots))]
            assert len(set(used)) == len(used), (role, used)
        # Who shares a GPU is exactly who shares a slot in the table.
        on_gpu = defaultdict(set)
        for key, report in got.items():
            on_gpu[(report["node"], report["gpus"][0])].add(key)
        assert {frozenset(ranks) for ranks in on_gpu.values()} == devices(table)
        # Within a colocation group, the table's nodes are distinct Ray nodes, each holding its ranks.
        for group in {placed.group for placed in table.values()}:
            by_node = defaultdict(set)
            for key, (g, node, _) in where(table).items():
                if g == group:
                    by_node[node].add(got[key]["node"])
            assert all(len(ids) == 1 for ids in by_node.values())
            assert len({ids.pop() for ids in by_node.values()}) == len(by_node)

    # Two nodes x 2 workers, [[actor, reference], [critic, reward]]: all 8 fake GPUs, 2 workers each.
    check(out["two_nodes"], colocation_table(SPLIT, 2, 2, 1, 1.0))
    # One node x 2 workers, [[actor, reference]]: STRICT_PACK on one node.
    check(out["one_node"], colocation_table([["actor", "reference"]], 1, 2, 1, 1.0))
    # What the slots prevent: two workers asking half a GPU in one bundle of a node's two GPUs
    # get the same one (Ray's best fit), the layout the code had before.
    assert out["node_bundle"][0] == out["node_bundle"][1]
