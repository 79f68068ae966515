"""The allocation a running Ray cluster offers a stage: how many nodes, and how many GPUs each.

`launchers/submit.sh` pipes `ray list nodes --detail --format json` through `python -m
rlhf.ray.allocation`, which prints "NODES GPUS_PER_NODE"; the script turns that into
`resources.*` overrides (launchers/_allocation.sh), one worker per GPU. Ray is not imported.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Iterable


def cluster_allocation(nodes: Iterable[dict[str, Any]]) -> tuple[int, int]:
    """(nodes, GPUs per node) of the alive nodes in Ray's node states. On a cluster with GPUs only
    the nodes holding some count (a CPU-only head does not take a share of a GPU job's workers),
    and the GPUs per node is the smallest count among them, so that one worker per GPU fits on
    every node. Without GPUs: every alive node, 0 GPUs."""
    alive = [node for node in nodes if node.get("state", "ALIVE") == "ALIVE"]
    if not alive:
        raise ValueError("the cluster reports no alive node")
    gpus = [int((node.get("resources_total") or {}).get("GPU", 0)) for node in alive]
    with_gpus = [count for count in gpus if count > 0]
    if with_gpus:
        return len(with_gpus), min(with_gpus)
    return len(alive), 0


def main() -> int:
    text = sys.stdin.read()
    try:
        nodes = json.loads(text)
        if not isinstance(nodes, list):
            raise ValueError("expected a JSON list of node states")
        count, gpus = cluster_allocation(nodes)
    except ValueError as exc:
        print(f"rlhf.ray.allocation: {exc}", file=sys.stderr)
        return 1
    print(count, gpus)
    return 0


if __name__ == "__main__":
    sys.exit(main())
