"""One training process of a stage, as a plain class: it exports the variables torchrun
would (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and runs
the stage's `main`, so the stage code is the same under Ray, torchrun or a plain process.
Stages arrive as objects with a `main(cfg)` (the registry's entries, stages/__init__.py):
nothing here knows which stages exist."""

from __future__ import annotations

import os
from typing import Any

from rlhf.distributed.env import free_port


def stage_summary(result: Any) -> dict:
    """What a stage run reports back to its launcher: summary metrics, model directory and,
    for a stage that started its own worker groups, where they ran."""
    summary = {"metrics": dict(result.metrics), "model_dir": str(result.model_dir)}
    if getattr(result, "nodes", None):
        summary["nodes"] = result.nodes
    return summary


def node_ip() -> str:
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except ImportError:
        pass
    return "127.0.0.1"


def interface_with_address(address: str) -> str | None:
    """The network interface that holds IPv4 `address` on this machine, or None."""
    import socket

    import psutil

    for name, addresses in psutil.net_if_addrs().items():
        if any(entry.family == socket.AF_INET and entry.address == address for entry in addresses):
            return name
    return None


def gloo_interface_env(address: str, environ: dict | None = None) -> dict[str, str]:
    """GLOO_SOCKET_IFNAME for a worker whose node is reached at `address` (the address Ray
    reports for the node): gloo otherwise advertises what the hostname resolves to, often
    127.0.0.1 (/etc/hosts), and the other nodes' connections to it are refused. Left alone
    when the user set it, for loopback addresses (one machine) and when no interface holds
    the address (behind NAT: gloo's own guess is all there is)."""
    environ = os.environ if environ is None else environ
    if "GLOO_SOCKET_IFNAME" in environ or address.startswith("127.") or address == "localhost":
        return {}
    name = interface_with_address(address)
    return {"GLOO_SOCKET_IFNAME": name} if name else {}


class WorkerBase:
    """What every training process started by Ray needs: its place in the group, the driver's
    working directory, and the launcher variables of torch.distributed."""

    def __init__(self, rank: int, world_size: int, local_rank: int, local_world_size: int, cwd: str):
        self.rank, self.world_size = rank, world_size
        self.local_rank, self.local_world_size = local_rank, local_world_size
        # Relative paths in the config mean the driver's working directory (a shared
        # filesystem); with a shipped runtime_env working_dir there is none, and Ray's copy is used.
        if os.path.isdir(cwd):
            os.chdir(cwd)

    def rendezvous(self) -> tuple[str, int]:
        """Address and a free port on this worker's node, for rank 0 to host the process group."""
        return node_ip(), free_port()

    def node_id(self) -> str:
        """The Ray node this worker runs on ("local" without Ray)."""
        try:
            import ray

            return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
        except ImportError:
            return "local"

    def pid(self) -> int:
        return os.getpid()

    def request_stop(self, signal_name: str = "SIGTERM") -> None:
        """The driver relays a SIGTERM / Ctrl-C: stop at the next step with a checkpoint."""
        from rlhf.training.stop import STOP

        STOP.request(signal_name)

    def export_launch_env(self, master_addr: str, master_port: int) -> None:
        os.environ.update({
            "RANK": str(self.rank), "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": str(self.local_rank), "LOCAL_WORLD_SIZE": str(self.local_world_size),
            "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port),
            **gloo_interface_env(node_ip()),
        })


class StageWorker(WorkerBase):
    def run(self, stage: Any, cfg: Any, master_addr: str, master_port: int) -> dict:
        """Run `stage.main(cfg)` as this worker's rank of the stage's process group."""
        self.export_launch_env(master_addr, master_port)
        return stage_summary(stage.main(cfg))
