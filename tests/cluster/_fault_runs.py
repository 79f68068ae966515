"""Driven by test_worker_faults.py inside a loopback namespace: each stage of the spec run once
straight and once with a worker SIGKILLed mid-run (after a checkpoint), on a local Ray, and
the stages listed under "single" also as one plain process first; writes the metrics of the
runs, the kills made and this driver's pid as JSON."""

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import ray
import torch

from rlhf.config import PPOConfig, SFTConfig, load_config
from rlhf.logging.metrics import read_metrics
from rlhf.ray.launch import run_stage_on_ray
from stages import STAGES


def kill_when(run_dir: Path, step: int, actor_name: str, kills: list) -> threading.Thread:
    """SIGKILL the process of `actor_name` once metrics.jsonl reaches `step`."""
    def watch():
        while True:
            try:
                rows = read_metrics(run_dir) if (run_dir / "metrics.jsonl").is_file() else []
            except json.JSONDecodeError:  # the last line is being written
                rows = []
            if any(r["step"] >= step for r in rows):
                pid = ray.get(ray.get_actor(actor_name, namespace="rlhf").pid.remote())
                os.kill(pid, signal.SIGKILL)
                kills.append({"actor": actor_name, "pid": pid, "after_step": max(r["step"] for r in rows)})
                return
            time.sleep(0.05)
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def main(spec_path: str, out_path: str) -> None:
    spec = json.loads(open(spec_path).read())
    root = Path(spec["root"])
    classes, actors = {"sft": SFTConfig, "ppo": PPOConfig}, {"sft": "sft-worker-1", "ppo": "ppo-critic-0"}
    out = {"kills": [], "driver_pid": os.getpid()}
    for stage in spec.get("single", []):  # the same config as one plain process, one thread like each Ray worker
        torch.set_num_threads(1)
        run_dir = root / f"{stage}_single"
        overrides = spec[stage] + [f"output_dir={run_dir}", "ray.enabled=false", "ppo.colocate=all"]
        STAGES[stage].main(load_config(classes[stage], [spec[f"{stage}_config"]], overrides))
        out[f"{stage}_single"] = read_metrics(run_dir)
    ray.init(num_cpus=2, include_dashboard=False, namespace="rlhf", _node_ip_address="127.0.0.1")
    for stage in spec["stages"]:
        cls, actor = classes[stage], actors[stage]
        for variant in ("straight", "killed"):
            run_dir = root / f"{stage}_{variant}"
            cfg = load_config(cls, [spec[f"{stage}_config"]], spec[stage] + [f"output_dir={run_dir}"])
            watcher = kill_when(run_dir, spec["kill_after"][stage], actor, out["kills"]) if variant == "killed" else None
            run_stage_on_ray(STAGES[stage], cfg)
            if watcher is not None:
                watcher.join(timeout=1)
            out[f"{stage}_{variant}"] = read_metrics(run_dir)
    ray.shutdown()
    Path(out_path).write_text(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
