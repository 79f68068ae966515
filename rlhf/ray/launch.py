"""Run a stage as `resources.workers` Ray actors that form one torch.distributed group, and
restart the group from its last complete checkpoint when a worker dies."""

from __future__ import annotations

import copy
import os
from typing import Any

from rlhf.errors import UserError
from rlhf.ray.group import Placement, WorkerDied, WorkerGroup, gather
from rlhf.ray.session import ray_session
from rlhf.ray.stage_worker import StageWorker, stage_summary


def run_stage_on_ray(stage: Any, cfg: Any) -> dict:
    """The summary (rank 0's) of `stage` (a registry entry: `name`, `main(cfg)`,
    `runs_on_driver(cfg)`, `code_dirs()`), after every worker finished. A stage whose loop runs
    on the driver (PPO with role groups, `ppo.colocate` a list) runs its `main` here; it starts
    its own worker groups.

    A dead worker (killed, out of memory, node lost) tears its whole group down; the stage
    then starts again with `train.resume=auto`, i.e. from the newest complete checkpoint,
    which restores the data position, so no batch is trained twice or skipped. After
    `train.max_restarts` restarts the stage stops, naming the role and the cause."""
    from rlhf.distributed.precision import probe_shape

    name = stage.name
    with ray_session(cfg.ray, stage.code_dirs(), probe_shape(cfg), cfg.logging.verbose):
        restarts = 0
        while True:
            try:
                return _run_once(stage, cfg)
            except WorkerDied as exc:
                restarts += 1
                if restarts > cfg.train.max_restarts:
                    raise UserError(f"{name}: {exc}; stopped after {cfg.train.max_restarts} restart(s) "
                                    "(train.max_restarts). The newest checkpoint is kept: re-run to resume") from None
                print(f"[ray] {name}: {exc}; restart {restarts}/{cfg.train.max_restarts} from the newest checkpoint")
                cfg = copy.deepcopy(cfg)
                cfg.train.resume = "auto"


def _run_once(stage: Any, cfg: Any) -> dict:
    if stage.runs_on_driver(cfg):
        return stage_summary(stage.main(cfg))
    resources = cfg.resources
    name = stage.name
    placement = Placement.reserve(resources, f"rlhf-{name}")
    group = None
    try:
        cwd = os.getcwd()
        group = WorkerGroup(StageWorker, placement,
                            lambda rank, local: (rank, resources.workers, local, resources.workers_per_node, cwd),
                            name=f"{name}-worker")
        nodes = group.call("node_id")
        print(f"[ray] {name}: {len(nodes)} worker(s) on {len(set(nodes))} node(s)")
        master_addr, master_port = gather([group.workers[0].rendezvous.remote()], group.name)[0]
        results = group.call("run", stage, cfg, master_addr, master_port)
        return {**results[0], "nodes": {"workers": nodes}}
    finally:
        if group is not None:
            group.kill()
        placement.release()
