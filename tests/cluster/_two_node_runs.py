"""Driven by test_two_node_cluster.py inside a loopback namespace: the same tiny SFT and PPO
runs once in this process and once on a two-node Ray cluster (ray.cluster_utils.Cluster, one
CPU per node); writes both runs' metrics and where the workers ran as JSON."""

import json
import sys

import torch

from rlhf.config import PPOConfig, SFTConfig, load_config
from rlhf.logging.metrics import read_metrics
from rlhf.ray.launch import run_stage_on_ray
from stages import STAGES


def main(spec_path: str, out_path: str) -> None:
    spec = json.loads(open(spec_path).read())
    torch.set_num_threads(1)  # as each Ray worker (one CPU each): same float summation order
    out = {}
    sft_single = load_config(SFTConfig, [spec["sft_config"]], spec["sft"] + [f"output_dir={spec['root']}/sft_single"])
    STAGES["sft"].main(sft_single)
    ppo_single = load_config(PPOConfig, [spec["ppo_config"]], spec["ppo"] + [f"output_dir={spec['root']}/ppo_single"])
    STAGES["ppo"].main(ppo_single)

    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        sft_ray = load_config(SFTConfig, [spec["sft_config"]], spec["sft"] + [
            f"output_dir={spec['root']}/sft_ray", "ray.enabled=true", f"ray.address={cluster.address}",
            "strategy.name=deepspeed", "strategy.zero_stage=2", "resources.num_nodes=2"])
        out["sft_nodes"] = run_stage_on_ray(STAGES["sft"], sft_ray)["nodes"]
        ppo_ray = load_config(PPOConfig, [spec["ppo_config"]], spec["ppo"] + [
            f"output_dir={spec['root']}/ppo_ray", "ray.enabled=true", f"ray.address={cluster.address}",
            "ppo.colocate=[[actor,reference],[critic,reward]]"])
        out["ppo_nodes"] = run_stage_on_ray(STAGES["ppo"], ppo_ray)["nodes"]
    finally:
        cluster.shutdown()
    for name in ("sft_single", "sft_ray", "ppo_single", "ppo_ray"):
        out[name] = read_metrics(f"{spec['root']}/{name}")
    with open(out_path, "w") as handle:
        json.dump(out, handle)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
