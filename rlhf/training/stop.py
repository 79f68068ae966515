"""Stopping a run cleanly when asked: SIGTERM (what SLURM sends before preemption or the time
limit), SIGINT (Ctrl-C), or the Ray driver relaying either to its workers.

The signal only sets a flag; the stage checks it at the end of each step (agreed over all
workers, so they stop at the same step), writes a checkpoint and raises `Interrupted`, which
the CLI prints as a resume hint with exit status 128 + signal number. A second signal while
the checkpoint is being written stops at once.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator


class Interrupted(Exception):
    """A run stopped by a signal after saving a checkpoint; re-running resumes it."""

    def __init__(self, message: str, signal_name: str = "SIGTERM"):
        super().__init__(message)
        self.signal_name = signal_name

    @property
    def exit_code(self) -> int:
        return 128 + int(getattr(signal.Signals, self.signal_name, signal.SIGTERM))


class StopRequest:
    """Process-wide: set by a signal handler or by `request()` (the Ray driver's relay)."""

    def __init__(self) -> None:
        self.signal_name: str | None = None

    def request(self, signal_name: str = "SIGTERM") -> None:
        if self.signal_name is None:
            self.signal_name = signal_name

    def clear(self) -> None:
        self.signal_name = None

    def agreed(self, strategy) -> bool:
        """True on every worker when any worker was asked to stop."""
        asked = 1.0 if self.signal_name is not None else 0.0
        if strategy.world_size > 1:
            asked = strategy.all_reduce({"stop": asked}, op="sum")["stop"]
        if asked > 0 and self.signal_name is None:
            self.signal_name = "SIGTERM"
        return asked > 0


STOP = StopRequest()


@contextmanager
def stop_on_signals(stop: StopRequest = STOP) -> Iterator[StopRequest]:
    """Turn SIGTERM and SIGINT into `stop` for the block. Handlers can only be installed from
    the main thread; elsewhere (e.g. inside a threaded Ray actor) only `request()` stops."""
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handle(signum, frame):  # noqa: ARG001
        if stop.signal_name is not None:
            raise KeyboardInterrupt  # asked twice: do not wait for the checkpoint
        stop.request(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def interrupted(stage: str, step: int, total: int, checkpoint, signal_name: str) -> Interrupted:
    return Interrupted(f"{stage} stopped by {signal_name} after step {step} of {total}; checkpoint {checkpoint}. "
                       "Run the same command again to resume from it (train.resume=auto)", signal_name)
