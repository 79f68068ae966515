"""Run a stage as `resources.workers` Ray actors that form one torch.distributed group, and
restart the group from its last complete checkpoint when a worker dies."""

from __future__ import annotations

import copy
import os
from typing import Any

from rlhf.errors import UserError
from rlhf.ray.group import Placement, WorkerDied, WorkerGroup, gather
from rlhf.ray.session import ray_session
from rlhf.ray.stage_worker import StageWorker


def run_stage_on_ray(stage: str, cfg: Any) -> dict:
    """The stage's summary (rank 0's), after every worker finished. PPO with role groups
    (`ppo.colocate` a list) runs its driver loop here and the roles as separate groups.

    A dead worker (killed, out of memory, node lost) tears its whole group down; the stage
    then starts again with `train.resume=auto`, i.e. from the newest complete checkpoint,
    which restores the data position, so no batch is trained twice or skipped. After
    `train.max_restarts` restarts the stage stops, naming the role and the cause."""
    with ray_session(cfg.ray):
        restarts = 0
        while True:
            try:
                return _run_once(stage, cfg)
            except WorkerDied as exc:
                restarts += 1
                if restarts > cfg.train.max_restarts:
                    raise UserError(f"{stage}: {exc}; stopped after {cfg.train.max_restarts} restart(s) "
                                    "(train.max_restarts). The newest checkpoint is kept: re-run to resume") from None
                print(f"[ray] {stage}: {exc}; restart {restarts}/{cfg.train.max_restarts} from the newest checkpoint")
                cfg = copy.deepcopy(cfg)
                cfg.train.resume = "auto"


def _run_once(stage: str, cfg: Any) -> dict:
    if stage == "ppo" and cfg.ppo.role_groups() is not None:
        from rlhf.ray.ppo_roles import run_ppo_with_role_groups

        return run_ppo_with_role_groups(cfg)
    resources = cfg.resources
    placement = Placement.reserve(resources, f"rlhf-{stage}")
    group = None
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
        if group is not None:
            group.kill()
        placement.release()
