"""A stage logging to W&B runs with no network at all: `rlhf sft` with logging.backends=[wandb]
and no WANDB_MODE set (offline is the config's default) runs in a network namespace holding
only loopback, so the `wandb-core` service process it starts is cut off too. The run finishes
offline with its files, and a packet capture in the namespace (_no_network.py) sees whether
any process tried to reach anything beyond loopback (a DNS query is enough to show it)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from child_runs import child_env
from logging_helpers import wandb_history, wandb_run_record

from cluster.loopback import loopback_namespace_available
from rlhf.logging.metrics import read_metrics

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
NETWORK_ERRORS = re.compile(r"dial tcp|no such host|network is unreachable|connection refused", re.IGNORECASE)

pytestmark = [pytest.mark.slow, pytest.mark.claim,
              pytest.mark.skipif(not loopback_namespace_available(),
                                 reason="needs unshare -n (a loopback-only network namespace)")]


@pytest.fixture(scope="module")
def isolated_run(tmp_path_factory, quickstart_data, tiny_model_dir) -> dict:
    """{"dir": the SFT run directory, "network": _no_network.py's report}."""
    root = tmp_path_factory.mktemp("wandb_no_network")
    run_dir, home = root / "sft", root / "wandb_home"
    # Offline must be the config's default (no WANDB_MODE); no launcher variable an earlier
    # in-process run left behind.
    env = {k: v for k, v in child_env().items() if not k.startswith("WANDB_")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO),
               **{name: str(home / name.lower()) for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR",
                                                              "WANDB_DATA_DIR")})
    stage = [sys.executable, "-m", "rlhf", "sft", f"model.path={tiny_model_dir}",
             f"data.train.path={quickstart_data['sft']}", f"output_dir={run_dir}", "train.max_steps=4",
             "train.eval_every=2", "train.micro_batch_size=8", "train.global_batch_size=8", "data.max_length=96",
             "data.max_prompt_length=48", "data.eval_fraction=0.05", "logging.backends=[wandb]",
             "logging.progress=false"]
    report = root / "network.json"
    command = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh",
               sys.executable, str(HERE / "_no_network.py"), str(report), *stage]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return {"dir": run_dir, "network": json.loads(report.read_text())}


def test_the_run_completes_offline_with_its_files_and_the_service_process_logs_no_attempt(isolated_run):
    run_dir = isolated_run["dir"]
    (offline,) = list((run_dir / "wandb").glob("offline-run-*"))
    assert list(offline.glob("run-*.wandb")) and (offline / "files" / "output.log").is_file()
    history = wandb_history(run_dir)
    assert sorted({row["_step"] for row in history}) == [r["step"] for r in read_metrics(run_dir)] == [0, 1, 2, 3, 4]
    config = {item.key: json.loads(item.value_json) for item in wandb_run_record(run_dir).config.update}
    assert config["train"]["max_steps"] == 4
    # The service process (wandb-core) ran in the namespace and served the run.
    core_log = (offline / "logs" / "debug-core.log").read_text()
    assert "stream started" in core_log and "stream closed" in core_log
    for log in offline.glob("logs/*.log"):
        attempts = [line for line in log.read_text(errors="replace").splitlines() if NETWORK_ERRORS.search(line)]
        assert not attempts, (log, attempts[:5])


def test_no_process_tried_to_reach_the_network(isolated_run):
    network = isolated_run["network"]
    assert network["probe_seen"]  # the capture sees a packet to the outside
    assert network["packets"] == [], network["packets"]
