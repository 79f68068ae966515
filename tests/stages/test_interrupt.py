"""SIGTERM (what SLURM sends before preemption) to `rlhf sft` mid-run: a checkpoint, a resume
hint and exit 143; running the same command again resumes and exports the model the
uninterrupted run exports."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from rlhf.logging.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]


def sft_command(out: Path, model: Path, data: dict) -> list[str]:
    return [sys.executable, "-m", "rlhf", "sft", "--config", str(REPO / "configs/sft.yaml"), f"output_dir={out}",
            f"model.path={model}", "model.tiny=null", f"data.train.path={data['sft']}", "data.pretrain.path=''",
            "train.max_steps=40", "train.micro_batch_size=8", "train.global_batch_size=8", "train.eval_every=0",
            "logging.progress=false"]


@pytest.mark.slow
def test_sigterm_checkpoints_and_the_rerun_resumes_to_the_same_model(tmp_path, tiny_model_dir, quickstart_data):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    straight = subprocess.run(sft_command(tmp_path / "straight", tiny_model_dir, quickstart_data), env=env,
                              capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr[-2000:]

    out = tmp_path / "stopped"
    command = sft_command(out, tiny_model_dir, quickstart_data)
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        rows = read_metrics(out) if (out / "metrics.jsonl").is_file() else []
        if any(r["step"] >= 5 for r in rows):
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "stopped by SIGTERM after step" in stderr and "Run the same command again to resume" in stderr
    assert "Traceback" not in stderr
    stopped_at = max(r["step"] for r in read_metrics(out))
    assert 5 <= stopped_at < 40 and not (out / "model").exists()

    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {out / 'checkpoints' / f'step-{stopped_at}'} at step {stopped_at}" in resumed.stdout
    assert [r["step"] for r in read_metrics(out)] == [r["step"] for r in read_metrics(tmp_path / "straight")]
    expected = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    got = load_file(out / "model" / "model.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:
        assert (expected[name] - got[name]).abs().max() <= 1e-6, name
