"""SIGTERM to `rlhf sft ... ray.enabled=true` (what SLURM sends, and what
launchers/slurm_ray.sbatch forwards to the driver): the driver relays it to its two Ray workers,
they checkpoint at the same step and stop, and the driver exits with 143 and one line; the
same command again resumes on a fresh private Ray and finishes. (That a resumed Ray run ends
with the uninterrupted run's metrics is test_worker_faults.py's check.) The driver starts its own private Ray (dashboard off, 127.0.0.1), as `make
quickstart` does, inside a loopback-only network namespace."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from child_runs import assert_stopped_with_one_line, child_env, logged_steps, stop_with_sigterm

from cluster.loopback import loopback_namespace_available
from rlhf.logging.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]


def isolated(command: list[str]) -> list[str]:
    return ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *command]


@pytest.mark.slow
@pytest.mark.claim
@pytest.mark.multiprocess
@pytest.mark.skipif(not loopback_namespace_available(), reason="needs unshare -n (a loopback-only network namespace)")
def test_sigterm_reaches_the_ray_workers_and_the_rerun_resumes(tmp_path, tiny_model_dir, quickstart_data):
    env = child_env(RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(REPO))

    def command(out: Path) -> list[str]:
        return isolated([sys.executable, "-m", "rlhf", "sft", "--config", str(REPO / "configs/sft.yaml"),
                         f"output_dir={out}", f"model.path={tiny_model_dir}", "model.tiny=null",
                         f"data.train.path={quickstart_data['sft']}", "data.pretrain.path=''",
                         "data.eval_fraction=0.02", "train.max_steps=120", "train.micro_batch_size=4",
                         "train.global_batch_size=8", "train.eval_every=0", "ray.enabled=true",
                         "resources.workers_per_node=2", "strategy.name=deepspeed", "strategy.zero_stage=2",
                         "logging.progress=false"])

    out = tmp_path / "stopped"
    process = subprocess.Popen(command(out), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stderr = stop_with_sigterm(process, out, 3)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    stopped_at = assert_stopped_with_one_line(process, stderr, "sft")
    assert 3 <= stopped_at < 120 and max(logged_steps(out)) == stopped_at
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step-{stopped_at}"
    assert not (out / "model").exists()

    resumed = subprocess.run(command(out), env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints' / f'step-{stopped_at}'} at step {stopped_at}" in resumed.stdout
    assert (out / "model" / "model.safetensors").is_file()
    assert [r["step"] for r in read_metrics(out)] == list(range(121))  # each step logged once
