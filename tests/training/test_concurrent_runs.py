"""Two runs started into one output directory: the second stops at once with one line and a
non-zero exit, and the first finishes with the same result as when it runs alone."""

from __future__ import annotations

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
            "train.max_steps=80", "train.micro_batch_size=8", "train.global_batch_size=8", "train.eval_every=0",
            "logging.progress=false"]


def numbers(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if not k.startswith("perf/") and k != "time"} for row in read_metrics(run_dir)]


@pytest.mark.slow
def test_a_second_run_into_the_same_directory_is_refused_and_the_first_is_unharmed(tmp_path, tiny_model_dir,
                                                                                   quickstart_data):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    alone = subprocess.run(sft_command(tmp_path / "alone", tiny_model_dir, quickstart_data), env=env,
                           capture_output=True, text=True, timeout=300)
    assert alone.returncode == 0, alone.stderr[-2000:]

    shared, go = tmp_path / "shared", tmp_path / "go"
    # The second `rlhf sft` is imported ahead and waits for `go`, so it starts within
    # milliseconds while the first is training.
    waiting = ("import os, sys, time\nimport rlhf.cli, stages.sft\n"
               f"while not os.path.exists({str(go)!r}):\n    time.sleep(0.01)\n"
               "sys.exit(rlhf.cli.main(sys.argv[1:]))\n")
    second = subprocess.Popen([sys.executable, "-c", waiting, *sft_command(shared, tiny_model_dir, quickstart_data)[3:]],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = subprocess.Popen(sft_command(shared, tiny_model_dir, quickstart_data), env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (shared / "metrics.jsonl").is_file() and time.time() < deadline:  # the first is training
        time.sleep(0.01)
    # Paused mid-training, the first cannot finish before the second reaches the lock on a fast
    # machine (which left the second looking at a finished run instead).
    os.kill(first.pid, signal.SIGSTOP)
    try:
        assert first.poll() is None, "the first run ended before it could be paused"
        go.touch()
        _, second_stderr = second.communicate(timeout=300)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    _, first_stderr = first.communicate(timeout=300)

    assert second.returncode == 2
    lines = second_stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "is in use by another run" in lines[0], lines
    assert str(shared) in lines[0] and f"pid {first.pid}" in lines[0]
    assert first.returncode == 0, first_stderr[-2000:]
    assert numbers(shared) == numbers(tmp_path / "alone")
    expected = load_file(tmp_path / "alone" / "model" / "model.safetensors")
    got = load_file(shared / "model" / "model.safetensors")
    assert all((expected[name] - got[name]).abs().max() == 0 for name in expected)
