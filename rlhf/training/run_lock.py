"""One run per output directory: an advisory lock held for the run's life.

`RunLock(directory)` takes `fcntl.flock(LOCK_EX | LOCK_NB)` on `<directory>/.rlhf-run.lock`
and writes who holds it (pid, host, start time) into that file. A second run on the same
directory fails at once with a `UserError` naming the directory and the holder. The kernel
drops the lock when the holder's process ends, however it ends, so a lock file left by a
killed run is simply taken over. Within one process the lock is re-entrant (a pipeline that
runs its stages one after another in one process): it is released when the last `release`
matches the first `acquire`.

The lock file is never deleted (deleting it would let two runs lock two different files);
on release it is emptied. On filesystems without flock support the run goes on unlocked,
with a warning.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import sys
import threading
from pathlib import Path

from rlhf.errors import UserError

LOCK_NAME = ".rlhf-run.lock"

_guard = threading.Lock()
_held: dict[tuple[int, str], list] = {}
"""(pid, lock file's real path) -> [fd or None, acquire count] for this process."""

_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class RunLock:
    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self._keys: list[tuple[int, str]] = []

    @property
    def held(self) -> bool:
        return any(pid == os.getpid() for pid, _ in self._keys)

    def acquire(self) -> "RunLock":
        """Take the lock (creating the directory); a UserError at once if another process holds it."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create the run directory {self.directory}: {exc.strerror or exc}") from None
        key = (os.getpid(), os.path.realpath(self.path))
        with _guard:
            entry = _held.get(key)
            if entry is not None:
                entry[1] += 1
                self._keys.append(key)
                return self
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _describe_holder(_read(fd))
                os.close(fd)
                raise UserError(f"{self.directory} is in use by another run ({holder}); wait for it to end, "
                                "or give this run another output directory") from None
            except OSError as exc:
                if exc.errno not in _UNSUPPORTED:
                    os.close(fd)
                    raise
                os.close(fd)
                fd = None
                print(f"[run-lock] warning: {self.directory} does not support file locks ({exc.strerror}); "
                      "nothing stops a second run from writing into it", file=sys.stderr, flush=True)
            if fd is not None:
                _write_holder(fd)
            _held[key] = [fd, 1]
            self._keys.append(key)
        return self

    def release(self) -> None:
        """Undo one `acquire`; the last one unlocks (and empties the lock file)."""
        with _guard:
            if not self._keys:
                return
            key = self._keys.pop()
            entry = _held.get(key)
            if entry is None or key[0] != os.getpid():  # a forked child never holds its parent's lock
                return
            entry[1] -= 1
            if entry[1] > 0:
                return
            del _held[key]
            fd = entry[0]
            if fd is not None:
                try:
                    os.ftruncate(fd, 0)
                except OSError:
                    pass
                os.close(fd)  # drops the flock

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()


def _write_holder(fd: int) -> None:
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    except OSError:
        pass  # the lock holds without the note (a full disk, say)


def _read(fd: int) -> str:
    try:
        return os.pread(fd, 4096, 0).decode("utf-8", "replace")
    except OSError:
        return ""


def _describe_holder(text: str) -> str:
    try:
        info = json.loads(text)
        pid, host, started = int(info["pid"]), str(info["host"]), str(info["started"])
    except (ValueError, KeyError, TypeError):
        return "holder unknown: it has not written its pid yet"
    described = f"pid {pid} on {host}, started {started}"
    if host == socket.gethostname() and not _alive(pid):
        described += "; that process has exited, but a process it started still holds the lock"
    return described


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
