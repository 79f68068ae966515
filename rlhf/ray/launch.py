"""Run a stage as `resources.workers` Ray actors that form one torch.distributed group."""

from __future__ import annotations

import os
from typing import Any

from rlhf.ray.group import Placement, WorkerGroup, gather
from rlhf.ray.session import ray_session
from rlhf.ray.stage_worker import StageWorker


def run_stage_on_ray(stage: str, cfg: Any) -> dict:
    """The stage's summary (rank 0's), after every worker finished. PPO with role groups
    (`ppo.colocate` a list) runs its driver loop here and the roles as separate groups."""
    with ray_session(cfg.ray):
        if stage == "ppo" and cfg.ppo.role_groups() is not None:
            from rlhf.ray.ppo_roles import run_ppo_with_role_groups

            return run_ppo_with_role_groups(cfg)
        resources = cfg.resources
        placement = Placement.reserve(resources, f"rlhf-{stage}")
        try:
            cwd = os.getcwd()
            group = WorkerGroup(StageWorker, placement,
                                lambda rank, local: (rank, resources.workers, local, resources.workers_per_node, cwd),
                                name=f"{stage}-worker")
            nodes = group.call("node_id")
            print(f"[ray] {stage}: {len(nodes)} worker(s) on {len(set(nodes))} node(s)")
            master_addr, master_port = gather([group.workers[0].rendezvous.remote()], group.name)[0]
            results = group.call("run", stage, cfg, master_addr, master_port)
            return {**results[0], "nodes": {"workers": nodes}}
        finally:
            placement.release()
