"""Reward functions for tests/rewards: the pool's workers import them by "module:function"
(pytest puts this folder on sys.path, and the pool hands sys.path to its workers)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time


def length(prompt, response, **fields):
    return float(len(response))


def constant(prompt, response, **fields):
    return 1.0


def with_fields(prompt, response, answer=None, bonus=0, **fields):
    # 10 * (response == answer) + bonus + number of other fields
    return 10.0 * (response == answer) + bonus + len(fields)


def raises_on_bad(prompt, response, **fields):
    if response == "bad":
        raise ZeroDivisionError("cannot score 'bad'")
    return 1.0


def hangs_on_hang(prompt, response, **fields):
    if response == "hang":
        time.sleep(120)
    return 2.0


def hangs_with_a_child(prompt, response, pid_file=None, **fields):
    """Starts a child process (as a sandbox would), writes its pid, then hangs."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    with open(pid_file, "w") as f:
        f.write(str(child.pid))
    time.sleep(120)
    return 0.0


def always_hangs(prompt, response, **fields):
    time.sleep(120)
    return 0.0


def crashes_on_die(prompt, response, **fields):
    if response == "die":
        os._exit(7)
    return 1.0


def odd_values(prompt, response, **fields):
    return {"nan": math.nan, "inf": math.inf, "str": "0.5", "none": None, "list": [1.0],
            "bad_dict": {"a": "x"}, "empty_dict": {}, "huge": 1e300, "int": 3, "bool": True}[response]


def components(prompt, response, **fields):
    if response == "bad":
        raise ValueError("no components for 'bad'")
    if response == "short":
        return {"format": 0.5}
    return {"correct": 1.0, "format": 0.5}


def torch_loaded(prompt, response, **fields):
    return float("torch" in sys.modules)


not_callable = 42


def slow_length(prompt, response, **fields):
    """The length, after half a second (a unit-test runner, say)."""
    time.sleep(0.5)
    return float(len(response))
