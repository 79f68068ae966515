"""The process a `RewardFunctionPool` runs reward functions in, and `load_function`.

Kept free of torch and of the rest of rlhf (a worker starts in ~0.1 s plus the import of the
user's modules). The parent talks to a worker over a socket (`multiprocessing.connection`
framing, pickled messages):

    parent -> worker   ("init", sys_path, specs)           load the functions
                       ("run", chunk, samples, calls)       samples: {i: (prompt, response, fields)},
                                                            calls: [(i, spec_index), ...]
                       None                                 exit
    worker -> parent   ("ready",) | ("failed", message)
                       ("results", chunk, [(position, status, value, components, message)], done)

and through 16 bytes of shared memory, two doubles written before every call: the start time
(`time.monotonic`, the same clock in every process) and the position of the call in its chunk
(-1 between chunks). The parent reads them to find a call past its timeout, kills the worker
and knows which call was stuck. Results are sent in groups, at the latest `FLUSH_S` after the
previous group, so that fast functions cost little IPC.
"""

from __future__ import annotations

import ctypes
import importlib
import math
import mmap
import os
import signal
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection

from rlhf.errors import UserError

OK, ERROR, NONFINITE = 0, 1, 2
"""Status of one call as the worker reports it (timeouts are the parent's to find)."""

FLUSH_S = 0.05
"""Longest time finished results wait in the worker before they are sent."""

PROGRESS_BYTES = 16


def load_function(spec: str):
    """The callable named by `spec`, "package.module:function" (the part after ":" may be a
    dotted path, e.g. "module:Class.method"). The module is imported from `sys.path`.

    Raises `UserError` naming the spec when the spec is malformed, the module cannot be imported
    (missing, or its own import fails), the attribute is missing or it is not callable."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise UserError(f"reward function {spec!r}: expected 'module:function', e.g. 'rlhf.rewards.builtin:exact_match'")
    try:
        target = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name and (module_name == error.name or module_name.startswith(error.name + ".")):
            raise UserError(f"reward function {spec!r}: no module named {error.name!r} "
                            f"(it is imported from sys.path and the working directory)") from None
        raise UserError(f"reward function {spec!r}: importing module {module_name!r} failed: {one_line(error)}") from None
    except Exception as error:  # the module's own code failed
        raise UserError(f"reward function {spec!r}: importing module {module_name!r} failed: {one_line(error)}") from None
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise UserError(f"reward function {spec!r}: module {module_name!r} has no attribute {attribute!r}") from None
    if not callable(target):
        raise UserError(f"reward function {spec!r}: {attribute!r} is a {type(target).__name__}, not callable")
    return target


def one_line(error: BaseException, limit: int = 300) -> str:
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _number(value) -> float | None:
    """`value` as a float, or None when it is not a number (a str, None, a list...). Accepts
    Python and numpy numbers, bools and 0-d / one-element tensors (anything with __float__)."""
    if type(value) is float:
        return value
    if isinstance(value, (str, bytes)) or not hasattr(type(value), "__float__"):
        return None
    try:
        return float(value)
    except Exception:
        return None


def to_reward(value) -> tuple[int, float, dict | None, str | None]:
    """(status, reward, components, message) for what a reward function returned."""
    if isinstance(value, dict):
        if not value:
            return NONFINITE, math.nan, None, "returned an empty dict"
        components, total = {}, 0.0
        for key, item in value.items():
            number = _number(item)
            if number is None:
                return NONFINITE, math.nan, None, f"component {key!r} is a {type(item).__name__}, not a number"
            if not math.isfinite(number):
                return NONFINITE, math.nan, None, f"component {key!r} is {number}"
            components[str(key)] = number
            total += number
        return OK, total, components, None
    number = _number(value)
    if number is None:
        return NONFINITE, math.nan, None, f"returned a {type(value).__name__}, not a number"
    if not math.isfinite(number):
        return NONFINITE, math.nan, None, f"returned {number}"
    return OK, number, None, None


def _exit_with_parent(parent: int) -> None:
    """A worker whose parent died (killed, crashed) exits, even if its function hangs in Python
    code (not if it hangs in C code that holds the GIL)."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(1)


def _run_chunk(conn: Connection, progress, functions, specs, reported: set, chunk, samples, calls) -> None:
    """Run the calls in order; `reported`: the specs whose first traceback this worker printed."""
    results: list = []
    last_flush = time.monotonic()
    for position, (sample, spec_index) in enumerate(calls):
        prompt, response, fields = samples[sample]
        progress[1] = time.monotonic()  # start time first, then the position (the parent reads
        progress[0] = position          # the position first, then the time)
        try:
            value = functions[spec_index](prompt, response, **fields)
        except Exception as error:
            results.append((position, ERROR, math.nan, None, one_line(error)))
            if spec_index not in reported:
                reported.add(spec_index)
                print(f"reward function {specs[spec_index]!r} raised (its first error in this worker; the next "
                      f"ones are only counted):\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        else:
            status, reward, components, message = to_reward(value)
            results.append((position, status, reward, components, message))
        now = time.monotonic()
        if now - last_flush >= FLUSH_S:
            conn.send(("results", chunk, results, False))
            results, last_flush = [], now
    progress[0] = -1.0
    conn.send(("results", chunk, results, True))


def main(socket_fd: int, progress_fd: int) -> None:
    """The worker's loop: load the functions, then run chunks of calls until told to exit or
    the parent goes away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the trainer handles Ctrl-C and closes the pool
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    conn = Connection(socket_fd)
    shared = mmap.mmap(progress_fd, PROGRESS_BYTES)
    progress = (ctypes.c_double * 2).from_buffer(shared)
    progress[0] = -1.0
    try:
        _, sys_path, specs = conn.recv()
        sys.path[:] = list(sys_path) + ([os.getcwd()] if os.getcwd() not in sys_path else [])
        try:
            functions = [load_function(spec) for spec in specs]
        except UserError as error:
            conn.send(("failed", str(error)))
            return
        conn.send(("ready",))
        reported: set[int] = set()
        while True:
            message = conn.recv()
            if message is None:
                return
            _, chunk, samples, calls = message
            _run_chunk(conn, progress, functions, specs, reported, chunk, samples, calls)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        return  # the parent closed the connection or died
