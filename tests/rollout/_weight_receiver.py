"""Rank 1 of test_vllm_actors.py's weight-group test, in a spawned process: a module of its own,
so that the child imports torch and the group alone, not the test module's imports."""

from __future__ import annotations

import torch

from rlhf.rollout.weight_broadcast import WeightGroup, open_store


def receive(port: int, queue) -> None:
    group = WeightGroup(open_store("127.0.0.1", 1, 2, port), 1, 2, torch.device("cpu"))
    queue.put([(name, tensor.dtype, tuple(tensor.shape), tensor.float().tolist()) for name, tensor in group.receive()])


def receive_one_header_then_die(port: int) -> None:
    """Join, take the first header, then die as a crashed engine would (SIGKILL: no goodbye
    on any socket but what the kernel closes)."""
    import os
    import signal

    group = WeightGroup(open_store("127.0.0.1", 1, 2, port), 1, 2, torch.device("cpu"))
    group._header()
    os.kill(os.getpid(), signal.SIGKILL)
