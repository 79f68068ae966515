"""Sharded engines against the single process, two CPU processes on gloo (_ema_worker.py):

- ZeRO-3 keeps its parameters as empty placeholders outside a gather: the EMA must average the
  gathered weights (and write them back), matching the single-process EMA;
- FSDP2 on two "nodes" of one worker each (LOCAL_WORLD_SIZE=1) shards over a (replicate,
  shard) HSDP mesh, trains as the single process does, and its EMA matches too.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhf.distributed.env import free_port

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("_ema_worker.py")
LAUNCH_VARIABLES = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR",
                    "MASTER_PORT", "OMP_NUM_THREADS"}


def _worker_module():
    spec = importlib.util.spec_from_file_location("_ema_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def launch(out: Path, strategy: str, workers_per_node: int) -> dict:
    """Two processes as a launcher would start them: one node of 2 workers, or 2 nodes of 1."""
    port = free_port()
    procs = []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
        env.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank % workers_per_node),
                   LOCAL_WORLD_SIZE=str(workers_per_node), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1")
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(out), strategy], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [proc.communicate(timeout=300)[0] for proc in procs]
    for rank, (proc, output) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"{strategy} rank {rank} failed:\n{output[-6000:]}"
    return {"run": json.loads((out / "run.json").read_text()), **torch.load(out / "weights.pt", weights_only=True)}


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ema-single")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _worker_module().run(out, "single")
    finally:
        torch.set_num_threads(threads)
    return {"run": json.loads((out / "run.json").read_text()), **torch.load(out / "weights.pt", weights_only=True)}


def assert_same_weights(got: dict, expected: dict, what: str) -> None:
    assert sorted(got) == sorted(expected), what
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-5, msg=lambda m: f"{what} {name}: {m}")


def test_zero3_ema_holds_the_gathered_weights(tmp_path, single):
    sharded = launch(tmp_path / "zero3", "zero3", workers_per_node=2)
    # An average the test can tell apart from the final weights.
    ema, final = single["ema"], single["final"]
    assert max(float((ema[k] - final[k]).abs().max()) for k in ema) > 1e-3
    assert_same_weights(sharded["ema"], ema, "EMA under ZeRO-3")
    assert sharded["run"]["ranks_holding_ema"] == 1  # rank 0 only: one host copy per run
    # copy_to wrote the average back into the partitions.
    assert_same_weights({k: sharded["written"][k] for k in ema}, ema, "weights after copy_to under ZeRO-3")


def test_fsdp_on_two_nodes_trains_on_an_hsdp_mesh_like_one_process(tmp_path, single):
    sharded = launch(tmp_path / "hsdp", "fsdp", workers_per_node=1)
    assert sharded["run"]["meshes"] == [[2, 1]]  # (replicate over nodes, shard within one)
    for series in ("losses", "norms"):
        torch.testing.assert_close(torch.tensor(sharded["run"][series]), torch.tensor(single["run"][series]),
                                   rtol=1e-5, atol=0, msg=lambda m: f"{series}: {m}")
    assert_same_weights(sharded["final"], single["final"], "final weights under HSDP")
    assert_same_weights(sharded["ema"], single["ema"], "EMA under HSDP")
    assert_same_weights({k: sharded["written"][k] for k in single["ema"]}, single["ema"],
                        "weights after copy_to under HSDP")
