"""Process-group checks, run in each process of a local launch (one per GPU on cuda:LOCAL_RANK
with NCCL, or 2 CPU processes with gloo): the group initialises, all_reduce / all_gather /
broadcast give the known answers on every rank, and a timed all_reduce gives the bus bandwidth.

This is the one place that calls torch.distributed itself rather than through a Strategy:
the collectives are what it tests. Device and backend come from the same function the
strategies use (rlhf/distributed/env.py), so it checks what training will run on.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from rlhf.distributed import env


def _correct(device: torch.device, rank: int, world: int) -> dict[str, bool]:
    ok: dict[str, bool] = {}
    values = torch.full((1024,), float(rank + 1), device=device)
    dist.all_reduce(values)
    ok["all_reduce"] = bool(torch.all(values == world * (world + 1) / 2))

    mine = torch.arange(256, dtype=torch.float32, device=device) + 1000 * rank
    parts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine)
    ok["all_gather"] = all(bool(torch.equal(p, torch.arange(256, dtype=torch.float32, device=device) + 1000 * r))
                           for r, p in enumerate(parts))

    expected = torch.randn(512, generator=torch.Generator().manual_seed(1234)).to(device)
    received = expected.clone() if rank == 0 else torch.zeros_like(expected)
    dist.broadcast(received, src=0)
    ok["broadcast"] = bool(torch.equal(received, expected))
    return ok


def bus_bandwidth(device: torch.device, world: int, megabytes: int, iterations: int) -> dict[str, float]:
    """Seconds per all_reduce of `megabytes` of fp32 and the bus bandwidth in GB/s, as
    nccl-tests defines it: size / time x 2(n-1)/n, the bytes each rank's link carries in a
    ring, so that the figure is comparable across rank counts."""
    tensor = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):  # warm-up: connections and buffers are set up on first use
        dist.all_reduce(tensor)
    sync()
    dist.barrier()
    started = time.perf_counter()
    for _ in range(iterations):
        dist.all_reduce(tensor)
    sync()
    seconds = (time.perf_counter() - started) / iterations
    size = tensor.numel() * 4
    return {"allreduce_seconds": seconds, "algbw_gbps": size / seconds / 1e9,
            "busbw_gbps": size / seconds / 1e9 * 2 * (world - 1) / world}


def run_collectives(spec: dict[str, Any], result_path: Path) -> None:
    """The worker's side (every rank); rank 0 writes what all ranks found."""
    launch = env.detect_launch()
    env.export_single_process_env(launch)
    device, backend = env.pick_device(launch.local_rank)
    if device.type == "cpu":
        env.configure_cpu_threads(launch)
    started = time.perf_counter()
    kwargs = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(backend, init_method="env://", rank=launch.rank, world_size=launch.world_size, **kwargs)
    try:
        init_seconds = time.perf_counter() - started
        rank, world = dist.get_rank(), dist.get_world_size()
        ok = _correct(device, rank, world)
        # Every rank's verdict, so that rank 0 reports a rank that got a wrong answer.
        flags = torch.tensor([float(not v) for v in ok.values()], device=device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        wrong = [name for name, bad in zip(ok, flags.tolist()) if bad]
        figures = bus_bandwidth(device, world, spec["megabytes"], spec["iterations"])
        if rank == 0:
            result = {"backend": backend, "world_size": world, "device": str(device), "wrong": wrong,
                      "init_seconds": init_seconds, "megabytes": spec["megabytes"], **figures}
            result_path.write_text(json.dumps(result), encoding="utf-8")
    finally:
        dist.destroy_process_group()
