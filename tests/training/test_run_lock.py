"""One run per output directory: a second run (another process) stops at once with one line
naming the directory and the holder; the lock goes with the holder however it ends (release,
exception, SIGKILL), and one process may take it again (stages run one after another)."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhf.errors import UserError
from rlhf.training.run_lock import LOCK_NAME, RunLock

REPO = Path(__file__).resolve().parents[2]

CHILD = """
import sys, time
from rlhf.errors import UserError
from rlhf.training.run_lock import RunLock
lock = RunLock(sys.argv[1])
start = time.monotonic()
try:
    lock.acquire()
except UserError as exc:
    print(f"{time.monotonic() - start:.3f}", flush=True)
    print(exc, flush=True)
    sys.exit(3)
print("LOCKED", flush=True)
if sys.argv[2] == "hold":
    time.sleep(600)
"""


def child(directory: Path, mode: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-c", CHILD, str(directory), mode], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def try_in_child(directory: Path) -> tuple[int, list[str]]:
    proc = child(directory, "try")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode in (0, 3), err
    return proc.returncode, out.splitlines()


def test_second_process_fails_at_once_with_one_line(tmp_path):
    run_dir = tmp_path / "run"
    with RunLock(run_dir):
        code, lines = try_in_child(run_dir)
    assert code == 3
    elapsed, message = float(lines[0]), lines[1:]
    assert elapsed < 1.0, "the second run must not wait for the lock"
    assert len(message) == 1
    assert message[0].startswith(f"{run_dir} is in use by another run (pid {os.getpid()} on {socket.gethostname()}, "
                                 "started ")
    # Released: the next run takes it.
    assert try_in_child(run_dir) == (0, ["LOCKED"])


def test_directory_is_created(tmp_path):
    run_dir = tmp_path / "not" / "yet"
    lock = RunLock(run_dir).acquire()
    try:
        assert (run_dir / LOCK_NAME).is_file()
        assert lock.held
    finally:
        lock.release()
    assert not lock.held


def test_released_on_exception(tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match="stage failed"):
        with RunLock(run_dir):
            assert try_in_child(run_dir)[0] == 3
            raise RuntimeError("stage failed")
    assert try_in_child(run_dir) == (0, ["LOCKED"])


def test_same_process_takes_it_again(tmp_path):
    run_dir = tmp_path / "run"
    outer = RunLock(run_dir)
    with outer:
        with RunLock(run_dir):  # the next stage of a pipeline, in the same process
            pass
        assert try_in_child(run_dir)[0] == 3, "still held by the outer acquire"
        with outer:  # the same object, nested
            pass
        assert try_in_child(run_dir)[0] == 3
    assert try_in_child(run_dir) == (0, ["LOCKED"])


def test_lock_of_a_killed_run_is_taken_over(tmp_path, capsys):
    run_dir = tmp_path / "run"
    holder = child(run_dir, "hold")
    try:
        assert holder.stdout.readline().strip() == "LOCKED", holder.stderr.read()
        with pytest.raises(UserError) as caught:
            RunLock(run_dir).acquire()
        assert f"pid {holder.pid} on {socket.gethostname()}" in str(caught.value)
        assert str(run_dir) in str(caught.value)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    assert holder.returncode == -signal.SIGKILL
    assert (run_dir / LOCK_NAME).read_text().strip(), "the killed run left its lock file behind"

    started = time.monotonic()
    with RunLock(run_dir):
        assert time.monotonic() - started < 1.0
        assert f'"pid": {os.getpid()}' in (run_dir / LOCK_NAME).read_text()
        assert try_in_child(run_dir)[0] == 3
    assert capsys.readouterr().err == "", "taken over silently"
