"""Starting a doctor worker as N local processes, torchrun-style (one per GPU, or 2 on a CPU),
with a time limit, its whole output in a log file and its findings in a JSON file.

The workers are `rlhf doctor --worker KIND --spec FILE`: the CLI hands them the stage registry,
which nothing under rlhf/ imports. One process runs without torchrun (a plain world of one).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import rlhf

_EXCEPTION_LINE = re.compile(r"^(\[rank\d+\]:\s*)?[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b:? ")
"""The last line of a Python traceback ("ValueError: ...", "[rank1]: RuntimeError: ...")."""
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                    "TORCHELASTIC_RUN_ID", "GROUP_RANK", "ROLE_RANK", "LOCAL_SIZE")


@dataclass
class Launched:
    returncode: int
    timed_out: bool
    result: Any
    """What rank 0 wrote (parsed JSON), or None."""
    log: Path

    def last_error_line(self) -> str:
        """The line that says why, for the table: the last exception a worker's traceback ends
        with (torchrun's own summary that follows it names no cause), else the last line that
        mentions an error, else the last line."""
        lines = [line.strip() for line in self.log.read_text(encoding="utf-8", errors="replace").splitlines()
                 if line.strip()]
        raised = [line for line in lines if _EXCEPTION_LINE.match(line) and "ChildFailedError" not in line]
        if raised:
            return raised[-1][:300]
        for line in reversed(lines):
            if "Error" in line or "error:" in line or "Exception" in line:
                return line[:300]
        return lines[-1][:300] if lines else "no output"

    def log_tail(self, chars: int = 6000) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")[-chars:]


def _child_env(extra: dict[str, str]) -> dict[str, str]:
    """This environment without a surrounding launch's variables, the code this process runs
    first on the path (so workers import the same rlhf and stages), and `extra`."""
    environ = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    root = str(Path(rlhf.__file__).resolve().parent.parent)
    environ["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [environ.get("PYTHONPATH")])])
    environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    environ.setdefault("HF_HUB_OFFLINE", "1")
    environ.update(extra)
    return environ


def launch_worker(kind: str, spec: dict[str, Any], processes: int, directory: Path, timeout_s: float,
                  extra_env: dict[str, str] | None = None) -> Launched:
    """Run the worker `kind` in `processes` local processes; wait at most `timeout_s`."""
    directory.mkdir(parents=True, exist_ok=True)
    result_path, spec_path, log = directory / "result.json", directory / "spec.json", directory / "output.log"
    result_path.unlink(missing_ok=True)
    spec_path.write_text(json.dumps({**spec, "result": str(result_path)}), encoding="utf-8")
    worker = ["-m", "rlhf", "doctor", "--worker", kind, "--spec", str(spec_path)]
    if processes > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               "--max-restarts", "0", *worker]
    else:
        cmd = [sys.executable, *worker]
    timed_out = False
    with open(log, "w", encoding="utf-8") as out:
        out.write(" ".join(cmd) + "\n")
        out.flush()
        # A session of its own: a timeout stops the launcher and every worker it started.
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=_child_env(extra_env or {}),
                                start_new_session=True)
        try:
            returncode = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            returncode = proc.wait()
        except BaseException:  # Ctrl-C reaches only this process: its workers go with it
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    result = None
    if result_path.is_file():
        try:
            result = json.loads(result_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            result = None
    return Launched(returncode, timed_out, result, log)
