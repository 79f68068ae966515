"""Host memory on the CPU: large blocks fault in as huge pages, steps of varying shapes do not
grow the process, fragmented free heap is handed back; RLHF_TUNE_HOST_MEMORY=0 changes nothing."""

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf.distributed.host_memory import HUGE_PAGES_ENV

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc's mallopt and Linux page faults")

THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")

CHURN = """
import resource
import rlhf  # before torch, as the CLI and every worker import it
import torch
from rlhf.distributed.host_memory import tune_host_memory
took = tune_host_memory()
def churn():
    for _ in range(5):
        blocks = [torch.ones(16 * 1024 * 1024) for _ in range(3)]  # 64 MB each, written through
        del blocks
churn()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
churn()
print(took, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

# The allocation pattern of an SFT step whose lengths change: logits and a transposed copy
# sized by the step's tokens, fixed-size weight gradients, small tensors, a few survivors.
# Kept entirely in glibc's heap (no mmap), this grew the process by ~25 MB per step.
VARYING_STEPS = """
import random
import torch
from rlhf.distributed.host_memory import tune_host_memory
def rss_mb():
    with open("/proc/self/status") as status:
        return int(next(l for l in status if l.startswith("VmRSS")).split()[1]) // 1024
print(tune_host_memory())
rng, survivors, sizes = random.Random(0), [], []
for step in range(40):
    n = rng.randint(300, 700)
    logits = torch.empty(n, 12000).fill_(1)
    head_grad = torch.empty(12000, 576).fill_(1)
    small = [torch.empty(rng.randint(10, 5000)).fill_(1) for _ in range(50)]
    copy = torch.empty(12000, n).fill_(1)
    del logits
    embedding_grad = torch.zeros(12000, 576)
    survivors.append(torch.empty(rng.randint(1, 200)).fill_(1))
    del embedding_grad, copy, small, head_grad
    if step in (9, 39):
        sizes.append(rss_mb())
print(sizes[0], sizes[1])
"""


def run(script: str, tune: str) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != HUGE_PAGES_ENV}
    env["RLHF_TUNE_HOST_MEMORY"] = tune
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    return out.stdout.split()


@pytest.mark.skipif(not THP_SETTING.exists() or "[never]" in THP_SETTING.read_text(),
                    reason="the kernel has transparent huge pages off")
def test_large_blocks_fault_in_as_huge_pages():
    tuned, tuned_faults = run(CHURN, "1")
    plain, plain_faults = run(CHURN, "0")
    assert (tuned, plain) == ("True", "False")
    # 15 blocks of 64 MB are 245,760 fresh 4 KB pages when every block is a new mapping.
    assert int(plain_faults) > 100_000
    assert int(tuned_faults) < int(plain_faults) / 10


def test_steps_of_varying_shapes_do_not_grow_the_process():
    took, after_10_steps, after_40_steps = run(VARYING_STEPS, "1")
    assert took == "True"
    assert int(after_40_steps) - int(after_10_steps) < 64


def test_huge_pages_are_requested_only_before_torch_and_when_enabled():
    probe = ("import os, sys\n{before}import rlhf\n"
             "print(os.environ.get('" + HUGE_PAGES_ENV + "', '-'))")
    assert run(probe.format(before=""), "1") == ["1"]
    assert run(probe.format(before=""), "0") == ["-"]
    assert run(probe.format(before="import torch\n"), "1") == ["-"]


FRAGMENTS = """
import torch
from rlhf.distributed.host_memory import release_fragments, tune_host_memory
def rss_mb():
    with open("/proc/self/status") as status:
        return int(next(l for l in status if l.startswith("VmRSS")).split()[1]) // 1024
assert tune_host_memory() and not release_fragments()  # the first call takes the baseline
blocks, pins = [], []
for _ in range(800):  # 1 MB blocks (heap-resident), each followed by a small survivor
    blocks.append(torch.ones(256 * 1024))
    pins.append(torch.ones(16))
steady = release_fragments()  # nothing freed yet
held = rss_mb()
del blocks  # ~800 MB of free heap below the survivors, which the heap cannot trim
print(steady, release_fragments(), held - rss_mb(), release_fragments())
"""


def test_fragmented_free_heap_is_handed_back():
    steady, released, dropped_mb, again = run(FRAGMENTS, "1")
    assert (steady, released, again) == ("False", "True", "False")
    assert int(dropped_mb) > 500
