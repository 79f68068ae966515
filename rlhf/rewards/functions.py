"""Reward functions written by users, run in worker processes with a timeout on every call.

A reward function is named "module:function" and called as

    f(prompt: str, response: str, **fields) -> float | dict[str, float]

with the prompt row's other columns as `fields` (e.g. `answer="42"`). A dict is a set of named
components: they are summed into the function's reward, and each is reported on its own
("module:function/name").

`RewardFunctionPool` keeps `workers` processes alive across calls (start-up is paid once) and
sends them the calls in chunks. Each call has `timeout_s` seconds: a call that raises, runs past
the timeout or returns something that is not a finite number gives NaN for that sample and is
counted; the batch goes on. A stuck or crashed worker is killed (with its process group) and
replaced, and the calls it had not reported are run again by the others.

Why processes started with `subprocess` (a fresh interpreter running `rlhf.rewards._worker`)
rather than `multiprocessing`: fork is unsafe in a trainer that holds torch's threads; "spawn"
and "forkserver" import the trainer's `__main__` module again in the workers (torch with it, and
any script without an `if __name__ == "__main__"` guard runs again). Measured on 2 cores with a
main script that imports torch: 2 workers ready in 3.0 s (spawn) and 2.5 s (forkserver, then
1.1 s per replacement); with `subprocess` 0.07 s, and 0.06 s per replacement. The worker imports
no torch; it gets the trainer's `sys.path` (plus the working directory, last), so what the
trainer can import the worker can. A trivial function runs at ~150-180k calls/s with 2 workers
on 2 cores (distinct samples of 2 kB; 4000 calls in ~27 ms); chunks carry up to 256 calls
and results come back in groups.
"""

from __future__ import annotations

import collections
import ctypes
import math
import mmap
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Sequence

import torch

from rlhf.errors import UserError
from rlhf.rewards._worker import ERROR, OK, PROGRESS_BYTES, load_function

__all__ = ["FAILURE_KINDS", "FunctionRewards", "RewardFunctionPool", "load_function"]

FAILURE_KINDS = ("errors", "timeouts", "nonfinite", "skipped")
"""errors: the call raised (or its worker crashed during it); timeouts: it ran past `timeout_s`;
nonfinite: it returned NaN/inf or something that is not a number (a str, None, a dict with such
a value, an empty dict); skipped: not run because the function had already timed out or crashed
its worker `max_kills` times in this batch."""

_ROOT = str(Path(__file__).resolve().parents[2])  # the directory that holds the rlhf package
_BOOT = ("import sys; sys.path.insert(0, sys.argv[3]); from rlhf.rewards._worker import main; "
         "main(int(sys.argv[1]), int(sys.argv[2]))")
_RESERVED = ("prompt", "response")


@dataclass
class FunctionRewards:
    """What the functions gave for one batch."""

    rewards: dict[str, torch.Tensor]
    """spec -> (batch,) float32: the function's reward (a dict's components summed); NaN where
    the call failed."""
    components: dict[str, torch.Tensor] = field(default_factory=dict)
    """"spec/name" -> (batch,) float32 for functions that return dicts: the component; NaN where
    the call failed, 0 where the call succeeded without that component."""
    failures: dict[str, int] = field(default_factory=dict)
    """Counts of failed calls: the totals under each of FAILURE_KINDS ("errors", "timeouts",
    "nonfinite", "skipped"), and per function under "spec/kind". Always every key."""
    messages: dict[str, str] = field(default_factory=dict)
    """spec -> one line describing the first failure of that function in this batch."""

    def metrics(self, prefix: str = "reward/") -> dict[str, float]:
        """Mean of each reward and component over the samples where it is finite, and the
        failure counts ("function_errors", ..., "module:function/errors", ...), as flat floats
        for a metrics logger, each name after `prefix`."""
        out = {}
        for name, values in {**self.rewards, **self.components}.items():
            finite = values[torch.isfinite(values)]
            out[f"{prefix}{name}"] = float(finite.mean()) if finite.numel() else math.nan
        # totals as "function_errors", ...; per function as "module:function/errors", ...
        out.update({f"{prefix}{kind if '/' in kind else 'function_' + kind}": float(count)
                    for kind, count in self.failures.items()})
        return out


class _Chunk:
    """Calls sent to one worker in one message."""

    def __init__(self, number: int, calls: list[tuple[int, int]]):
        self.number = number
        self.calls = calls
        self.reported = [False] * len(calls)


class _Worker:
    """One worker process, its connection and its shared progress record."""

    def __init__(self, specs: list[str]):
        parent_socket, child_socket = socket.socketpair()
        if hasattr(os, "memfd_create"):
            progress_fd = os.memfd_create("rlhf-reward-progress")
        else:  # other POSIX systems: an unlinked temporary file
            progress_fd = os.dup(tempfile.TemporaryFile().fileno())
        try:
            os.ftruncate(progress_fd, PROGRESS_BYTES)
            self._shared = mmap.mmap(progress_fd, PROGRESS_BYTES)
            self.progress = (ctypes.c_double * 2).from_buffer(self._shared)
            self.progress[0] = -1.0
            # Reward functions are light and share the cores with the trainer: one thread each.
            env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
                       TOKENIZERS_PARALLELISM="false")
            child_fd = child_socket.fileno()
            self.process = subprocess.Popen(
                [sys.executable, "-c", _BOOT, str(child_fd), str(progress_fd), _ROOT],
                pass_fds=(child_fd, progress_fd), env=env, stdin=subprocess.DEVNULL,
                start_new_session=True)  # own process group: killed with whatever it started
        finally:
            child_socket.close()
            os.close(progress_fd)
        self.conn = Connection(parent_socket.detach())
        self.conn.send(("init", list(sys.path), specs))
        self.state = "starting"  # -> "idle" <-> "busy"; "dead" once killed
        self.started = time.monotonic()
        self.chunk: _Chunk | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def kill(self) -> None:
        """Kill the worker and its process group, and reap it (no zombie left)."""
        try:  # the group outlives its leader's exit while a member lives; its id is not reused
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.process.wait()
        self.state = "dead"

    def drain(self) -> list:
        """Messages still readable (after the worker was killed or died)."""
        messages = []
        try:
            while self.conn.poll(0):
                messages.append(self.conn.recv())
        except (EOFError, OSError):
            pass
        return messages

    def close(self) -> None:
        self.conn.close()
        del self.progress
        self._shared.close()


class RewardFunctionPool:
    """Runs reward functions in `workers` processes, each call with a `timeout_s` limit.

    Create it once; call it for every batch; `close()` it (or use it as a context manager).
    The constructor starts the workers and waits until every one has imported the functions:
    a spec whose module or function is missing raises `UserError` naming it.

    `start_timeout_s`: how long a worker may take to import the functions. `max_kills`: after
    this many timeouts or worker crashes caused by one function in one batch, its remaining
    calls in the batch are skipped (default max(2, workers)), so a function that always hangs
    costs about one timeout per batch, not one per call. `chunk_size`: calls per message to a
    worker (default: the batch spread over 4 chunks per worker, at most 256, fewer for slow
    functions)."""

    def __init__(self, specs: Sequence[str], workers: int = 2, timeout_s: float = 10.0, *,
                 start_timeout_s: float = 120.0, max_kills: int | None = None, chunk_size: int | None = None):
        self.specs = list(specs)
        if not self.specs:
            raise UserError("reward functions: the list is empty")
        repeated = sorted({s for s in self.specs if self.specs.count(s) > 1})
        if repeated:
            raise UserError(f"reward functions: {', '.join(repeated)} listed more than once")
        if workers < 1 or not timeout_s > 0:
            raise UserError(f"reward functions: need workers >= 1 and a timeout > 0 (got {workers}, {timeout_s})")
        self.timeout_s = float(timeout_s)
        self.start_timeout_s = float(start_timeout_s)
        self.max_kills = max_kills if max_kills is not None else max(2, workers)
        self.chunk_size = chunk_size
        self._seconds_per_call: float | None = None  # measured, to size the chunks
        self._chunks = 0
        self._lock = threading.Lock()
        self._closed = False
        self._workers: list[_Worker] = []
        started = time.monotonic()
        try:
            self._workers = [_Worker(self.specs) for _ in range(workers)]
            while any(w.state == "starting" for w in self._workers):
                self._serve(started_only=True)
        except BaseException:
            self.close()
            raise
        self.startup_s = time.monotonic() - started
        """Seconds the constructor took to start the workers and load the functions."""

    # -- public -------------------------------------------------------------------------------

    @property
    def pids(self) -> list[int]:
        """Process ids of the current workers."""
        return [w.pid for w in self._workers]

    def __enter__(self) -> "RewardFunctionPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_workers", None) and not getattr(self, "_closed", True):
            self.close()

    def close(self) -> None:
        """Stop the workers: each is told to exit (a starting one once it has loaded), and
        killed, with its process group, if it has not within 1 s."""
        if getattr(self, "_closed", False):
            return
        self._closed = True
        for worker in self._workers:
            if worker.state != "dead":
                try:
                    worker.conn.send(None)
                except OSError:
                    pass
        deadline = time.monotonic() + 1.0
        for worker in self._workers:
            if worker.state != "dead":
                try:
                    worker.process.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
                worker.kill()
            worker.close()
        self._workers = []

    def __call__(self, prompts: Sequence[str], responses: Sequence[str],
                 fields: Sequence[dict] | None = None) -> FunctionRewards:
        """Every function's reward for every (prompt, response, fields) sample."""
        n = len(prompts)
        fields = [{} for _ in range(n)] if fields is None else [row or {} for row in fields]
        if len(responses) != n or len(fields) != n:
            raise ValueError(f"{n} prompts, {len(responses)} responses and {len(fields)} fields")
        for row in fields:
            clash = [key for key in _RESERVED if key in row]
            if clash:
                raise UserError(f"reward functions: the prompt rows have a field named {clash[0]!r}, which clashes "
                                f"with the function's own argument; rename that column")
        with self._lock:
            if self._closed:
                raise RuntimeError("the reward function pool is closed")
            return self._run(list(prompts), list(responses), fields)

    # -- the batch ----------------------------------------------------------------------------

    def _run(self, prompts: list[str], responses: list[str], fields: list[dict]) -> FunctionRewards:
        n, specs = len(prompts), self.specs
        self._batch = batch = _Batch(n, specs)
        self._samples = [(p, r, f) for p, r, f in zip(prompts, responses, fields)]
        self._pending = collections.deque((i, s) for i in range(n) for s in range(len(specs)))
        self._kills = collections.Counter()
        self._size = self._chunk_size(len(self._pending))
        started = time.monotonic()
        while self._pending or any(w.state == "busy" for w in self._workers):
            self._serve()
        calls = n * len(specs)
        if calls and not self._kills:  # a batch with a timeout says nothing of the usual speed
            per_call = (time.monotonic() - started) * len(self._workers) / calls
            self._seconds_per_call = per_call if self._seconds_per_call is None else (
                0.5 * self._seconds_per_call + 0.5 * per_call)
        return batch.result()

    def _chunk_size(self, calls: int) -> int:
        if self.chunk_size:
            return self.chunk_size
        size = min(256, math.ceil(calls / (4 * len(self._workers))))
        if self._seconds_per_call:  # slow functions: chunks of about 0.2 s, for balance
            size = min(size, int(0.2 / self._seconds_per_call))
        return max(1, size)

    def _dispatch(self, worker: _Worker) -> None:
        calls = [self._pending.popleft() for _ in range(min(self._size, len(self._pending)))]
        self._chunks += 1
        worker.chunk = _Chunk(self._chunks, calls)
        samples = {i: self._samples[i] for i, _ in calls}
        worker.conn.send(("run", self._chunks, samples, calls))
        worker.state = "busy"

    def _serve(self, started_only: bool = False) -> None:
        """One round: hand out chunks, wait for results (or a deadline), handle what came."""
        if not started_only:
            for worker in self._workers:
                if worker.state == "idle" and self._pending:
                    self._dispatch(worker)
        waiting = [w for w in self._workers if w.state in ("starting", "busy")]
        if not waiting:
            return
        now = time.monotonic()
        deadlines = [self._deadline(w) for w in waiting]
        ready = wait([w.conn for w in waiting], timeout=max(0.001, min(deadlines) - now))
        for worker in waiting:
            if worker.conn in ready:
                self._receive(worker)
        now = time.monotonic()
        for worker in waiting:
            if worker.state == "starting" and now > worker.started + self.start_timeout_s:
                worker.kill()
                raise UserError(f"reward functions: a worker did not load {', '.join(self.specs)} within "
                                f"{self.start_timeout_s:g} s")
            if worker.state == "busy":
                position, since = int(worker.progress[0]), worker.progress[1]
                if (0 <= position < len(worker.chunk.calls) and not worker.chunk.reported[position]
                        and now - since > self.timeout_s):
                    self._lost(worker, position, "timeouts", f"timed out after {self.timeout_s:g} s")

    def _deadline(self, worker: _Worker) -> float:
        if worker.state == "starting":
            return worker.started + self.start_timeout_s
        position, since = int(worker.progress[0]), worker.progress[1]
        if position >= 0:
            return since + self.timeout_s
        return time.monotonic() + self.timeout_s

    def _receive(self, worker: _Worker) -> None:
        try:
            while worker.conn.poll(0):
                self._handle(worker, worker.conn.recv())
        except (EOFError, OSError):  # the worker died
            code = worker.process.wait()
            if worker.state == "starting":
                raise UserError(f"reward functions: a worker exited with code {code} while loading "
                                f"{', '.join(self.specs)} (its output is above)") from None
            if worker.state == "busy":
                position = int(worker.progress[0])
                self._lost(worker, position, "errors", f"the worker process died (exit code {code}) during the call")
            else:
                self._replace(worker)

    def _handle(self, worker: _Worker, message) -> None:
        kind = message[0]
        if kind == "ready":
            worker.state = "idle"
        elif kind == "failed":
            raise UserError(message[1])
        elif kind == "results":
            _, number, results, done = message
            chunk = worker.chunk
            for position, status, value, components, text in results:
                chunk.reported[position] = True
                sample, spec = chunk.calls[position]
                self._batch.record(sample, spec, status, value, components, text)
            if done:
                worker.chunk, worker.state = None, "idle"

    def _lost(self, worker: _Worker, position: int, kind: str, text: str) -> None:
        """The worker timed out on (or died during) the call at `position`: kill and replace it,
        count that call, put the calls it did not report back at the head of the queue."""
        worker.kill()
        for message in worker.drain():  # results it sent before it was killed
            if message[0] == "results":
                self._handle(worker, message)
        chunk = worker.chunk
        if chunk is not None:
            if 0 <= position < len(chunk.calls) and not chunk.reported[position]:
                sample, spec = chunk.calls[position]
                chunk.reported[position] = True
                self._batch.fail(sample, spec, kind, text)
                self._kills[spec] += 1
            retry = [call for call, done in zip(chunk.calls, chunk.reported) if not done]
            self._pending.extendleft(reversed(retry))
            self._skip_tripped()
        self._replace(worker)

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        worker.close()
        self._workers[self._workers.index(worker)] = _Worker(self.specs)

    def _skip_tripped(self) -> None:
        tripped = {s for s, count in self._kills.items() if count >= self.max_kills}
        if not tripped:
            return
        keep = collections.deque()
        for sample, spec in self._pending:
            if spec in tripped:
                self._batch.fail(sample, spec, "skipped",
                                 f"skipped: {self._kills[spec]} calls timed out or crashed their worker in this batch")
            else:
                keep.append((sample, spec))
        self._pending = keep


class _Batch:
    """The results of one batch as they come in."""

    def __init__(self, n: int, specs: list[str]):
        self.n, self.specs = n, specs
        self.values = [[math.nan] * n for _ in specs]
        self.ok = [[False] * n for _ in specs]
        self.components: dict[tuple[int, str], list[float]] = {}
        self.failures = collections.Counter({kind: 0 for kind in FAILURE_KINDS})
        self.messages: dict[str, str] = {}

    def record(self, sample: int, spec: int, status: int, value: float, components: dict | None,
               text: str | None) -> None:
        if status != OK:
            self.fail(sample, spec, "errors" if status == ERROR else "nonfinite", text or "")
            return
        self.values[spec][sample] = value
        self.ok[spec][sample] = True
        if components:
            for key, number in components.items():
                column = self.components.get((spec, key))
                if column is None:
                    column = self.components[(spec, key)] = [math.nan] * self.n
                column[sample] = number

    def fail(self, sample: int, spec: int, kind: str, text: str) -> None:
        self.failures[kind] += 1
        self.failures[f"{self.specs[spec]}/{kind}"] += 1
        self.messages.setdefault(self.specs[spec], f"{kind}: {text}")

    def result(self) -> FunctionRewards:
        rewards, components = {}, {}
        for s, spec in enumerate(self.specs):
            values = torch.tensor(self.values[s], dtype=torch.float32)
            overflow = torch.isinf(values)  # finite in float64, beyond float32's range
            for sample in overflow.nonzero().flatten().tolist():
                self.ok[s][sample] = False
                self.fail(sample, s, "nonfinite", f"returned {self.values[s][sample]:g}, beyond float32")
            rewards[spec] = values.masked_fill(overflow, math.nan)
        for (s, key), column in sorted(self.components.items()):
            ok = torch.tensor(self.ok[s])
            values = torch.tensor(column, dtype=torch.float32)
            components[f"{self.specs[s]}/{key}"] = torch.where(ok & values.isnan(), 0.0, values).masked_fill(~ok, math.nan)
        failures = {kind: self.failures[kind] for kind in FAILURE_KINDS}
        failures.update({f"{spec}/{kind}": self.failures[f"{spec}/{kind}"] for spec in self.specs for kind in FAILURE_KINDS})
        return FunctionRewards(rewards, components, failures, dict(self.messages))
