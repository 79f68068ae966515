"""Helpers of the tests that run `rlhf` in child processes: an environment free of the launcher
variables an earlier in-process run left behind; stopping a running command with SIGTERM once
its run has logged a step, and checking how it stopped (tests/stages/test_interrupt.py,
tests/cluster/test_ray_sigterm.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from rlhf.logging.metrics import read_metrics

# What a launcher sets, and what an in-process run earlier in the session leaves in os.environ
# (rlhf/distributed/env.py): a child must not take them for its own launch.
LAUNCH_VARIABLES = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT",
                    "OMP_NUM_THREADS"}


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment without the launcher variables, plus `extra`."""
    return {**{k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}, **extra}


def logged_steps(run_dir: Path) -> list[int]:
    """Steps of the complete lines of metrics.jsonl so far (the run may be writing the last one)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        if line.endswith("\n") and line.strip():
            steps.append(json.loads(line)["step"])
    return steps


def stop_with_sigterm(process: subprocess.Popen, run_dir: Path, after_step: int) -> str:
    """SIGTERM `process` once `run_dir` has logged `after_step`; its stderr."""
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if any(step >= after_step for step in logged_steps(run_dir)):
            break
        time.sleep(0.02)
    assert process.poll() is None, "the run ended before it could be stopped:\n" + process.communicate()[1][-3000:]
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=240)
    return stderr


def assert_stopped_with_one_line(process: subprocess.Popen, stderr: str, stage: str) -> int:
    """Exit 128 + SIGTERM, one `stopped:` line naming the step and the resume hint, no traceback;
    the step it stopped after."""
    assert process.returncode == 128 + signal.SIGTERM, f"exit {process.returncode}:\n{stderr[-3000:]}"
    stopped = [line for line in stderr.splitlines() if line.startswith("stopped:")]
    assert len(stopped) == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert f"{stage} stopped by SIGTERM after step" in stopped[0]
    assert "Run the same command again to resume" in stopped[0]
    return int(stopped[0].split("after step ")[1].split()[0])


def numbers(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if not k.startswith("perf/") and k != "time"} for row in read_metrics(run_dir)]
