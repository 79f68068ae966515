"""Run a command in a loopback-only network namespace: Ray's services listen on every
interface of the machine, and tests must not open anything beyond 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import subprocess
from functools import lru_cache
from typing import Sequence


@lru_cache(maxsize=1)
def loopback_namespace_available() -> bool:
    if not shutil.which("unshare") or not shutil.which("ip"):
        return False
    probe = subprocess.run(["unshare", "-n", "sh", "-c", "ip link set lo up"], capture_output=True)
    return probe.returncode == 0


def run_isolated(command: Sequence[str], timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    """`command` inside a fresh network namespace holding only 127.0.0.1."""
    environ = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", WANDB_MODE="offline", **(env or {}))
    wrapped = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *command]
    return subprocess.run(wrapped, capture_output=True, text=True, timeout=timeout, env=environ)
