"""Where this process sits in a launch, and what it runs on.

`torchrun` and the `deepspeed` launcher both export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR
and MASTER_PORT; torchrun adds LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE and a
`--local_rank=N` argument (`strip_launcher_args` drops it: LOCAL_RANK carries the same).
A plain `python -m rlhf ...` is a world of one on 127.0.0.1 and a free port.

Device and backend: CUDA + NCCL where a GPU exists, CPU + gloo otherwise. On CPU, processes
on one machine share its cores: each gets cores / local processes threads (torchrun sets
OMP_NUM_THREADS=1 itself; the deepspeed launcher does not, and two threads per process on a
shared core run many times slower; see BENCHMARKS.md, 'Measurements behind the code').
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch


@dataclass(frozen=True)
class LaunchInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    """Processes on this machine (they share its cores and GPUs)."""
    master_addr: str
    master_port: int
    launcher: str
    """torchrun, env (RANK/WORLD_SIZE exported by another launcher, e.g. deepspeed) or none."""


def _int(environ: Mapping[str, str], *names: str, default: int) -> int:
    for name in names:
        value = environ.get(name, "")
        if value.strip():
            return int(value)
    return default


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def detect_launch(environ: Mapping[str, str] | None = None) -> LaunchInfo:
    """Read the launcher's variables; without a launcher, a world of one."""
    environ = os.environ if environ is None else environ
    if "RANK" not in environ or "WORLD_SIZE" not in environ:
        return LaunchInfo(0, 1, 0, 1, "127.0.0.1", 0, "none")
    world_size = _int(environ, "WORLD_SIZE", default=1)
    return LaunchInfo(
        rank=_int(environ, "RANK", default=0),
        world_size=world_size,
        local_rank=_int(environ, "LOCAL_RANK", default=0),
        local_world_size=_int(environ, "LOCAL_WORLD_SIZE", "LOCAL_SIZE", default=world_size),
        master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
        master_port=_int(environ, "MASTER_PORT", default=0),
        launcher="torchrun" if "TORCHELASTIC_RUN_ID" in environ else "env",
    )


def export_single_process_env(launch: LaunchInfo) -> None:
    """`env://` initialisation (and DeepSpeed, which otherwise looks for MPI) needs the
    launcher variables even for one process. They stay for the life of the process, as the
    process group they describe does."""
    if launch.launcher != "none":
        return
    values = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    for name, value in values.items():
        os.environ.setdefault(name, value)


def pick_device(local_rank: int) -> tuple[torch.device, str]:
    """(device, process-group backend) for this process."""
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device()), "nccl"
    return torch.device("cpu"), "gloo"


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def threads_per_process(local_world_size: int, environ: Mapping[str, str] | None = None) -> int:
    """OMP_NUM_THREADS when the user or launcher set it, else an even share of the cores."""
    environ = os.environ if environ is None else environ
    if environ.get("OMP_NUM_THREADS", "").strip().isdigit():
        return max(1, int(environ["OMP_NUM_THREADS"]))
    return max(1, available_cores() // max(1, local_world_size))


def configure_cpu_threads(launch: LaunchInfo) -> int:
    threads = threads_per_process(launch.local_world_size)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    return threads


def prepare_deepspeed_import() -> None:
    """DeepSpeed picks its accelerator when first imported: make it CPU where no GPU exists."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def strip_launcher_args(argv: Sequence[str]) -> list[str]:
    """Drop the `--local_rank=N` / `--local_rank N` the deepspeed launcher appends."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg.startswith(("--local_rank=", "--local-rank=")):
            continue
        if arg in ("--local_rank", "--local-rank"):
            skip = True
            continue
        out.append(arg)
    return out
