"""The run's defaults when the command line does not give them: the device type, the memory
of one worker's device, and the worker count. torch is imported only to ask about CUDA."""

from __future__ import annotations

import os
from typing import Any

from rlhf.errors import UserError
from rlhf.plan.units import GiB


def detect_device_type() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def detect_device_memory(device_type: str, local_workers: int = 1) -> tuple[int, str]:
    """(bytes per worker, where the number comes from): the GPU's total memory, or on CPU this
    machine's RAM shared by the workers running on it."""
    if device_type == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError("planning a CUDA run on a machine without a CUDA device: give --device-memory-gb "
                            "(one GPU's memory in GiB)")
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return props.total_memory, f"{props.name} total memory"
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    local_workers = max(local_workers, 1)
    if local_workers == 1:
        return ram, "this machine's RAM, no CUDA device"
    return ram // local_workers, f"this machine's RAM ({ram / GiB:.1f} GiB) shared by {local_workers} local workers"


def local_workers(cfg: Any, workers: int) -> int:
    """Workers that share this machine: resources.workers_per_node on Ray, else
    $LOCAL_WORLD_SIZE; never more than `workers`."""
    if cfg.ray.enabled:
        return min(cfg.resources.workers_per_node, workers)
    return min(_env_int("LOCAL_WORLD_SIZE", workers), workers)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise UserError(f"{name}={value!r} is not an integer") from None


def default_workers(cfg: Any) -> int:
    """resources.num_nodes x workers_per_node on Ray, else WORLD_SIZE (torchrun / deepspeed), else 1."""
    if cfg.ray.enabled:
        return cfg.resources.workers
    return _env_int("WORLD_SIZE", 1)
