"""Host memory on the CPU: steps of varying shapes do not grow the process without bound,
fragmented free heap is handed back, and fresh large blocks fault in huge pages;
RLHF_TUNE_HOST_MEMORY=0 changes nothing."""

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc's mallopt and Linux page faults")

# The allocation pattern of an SFT step whose lengths change: logits and a transposed copy
# sized by the step's tokens, fixed-size weight gradients, small tensors, a few survivors.
# Its blocks of 14-33 MB fragment glibc's heap: with the defaults, and in most runs also with
# the tuned threshold, the process grew by ~1.8 GB over the 80 steps unless `release_fragments`
# (which the strategies call after every optimizer step) handed the pages back.
VARYING_STEPS = """
import random, sys
import torch
from rlhf.config_sections import KernelsConfig
from rlhf.kernels.host_memory import release_fragments, tune_host_memory
def rss_mb():
    with open("/proc/self/status") as status:
        return int(next(l for l in status if l.startswith("VmRSS")).split()[1]) // 1024
print(tune_host_memory(KernelsConfig().effective().tune_host_memory))  # as the stages set it up
torch.set_num_threads(1)  # one allocating thread: the same heap layout in every run
rng, survivors, sizes = random.Random(0), [], []
for step in range(80):
    if sys.argv[1] == "guarded":
        release_fragments()
    n = rng.randint(300, 700)
    logits = torch.empty(n, 12000).fill_(1)
    head_grad = torch.empty(12000, 576).fill_(1)
    small = [torch.empty(rng.randint(10, 5000)).fill_(1) for _ in range(50)]
    copy = torch.empty(12000, n).fill_(1)
    del logits
    embedding_grad = torch.zeros(12000, 576)
    survivors.append(torch.empty(rng.randint(1, 200)).fill_(1))
    del embedding_grad, copy, small, head_grad
    if step in (9, 79):
        sizes.append(rss_mb())
print(sizes[0], sizes[1])
"""


def run(script: str, tune: str, *args: str) -> list[str]:
    env = {**os.environ, "RLHF_TUNE_HOST_MEMORY": tune}
    out = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True,
                         check=True)
    return out.stdout.split()


def test_steps_of_varying_shapes_do_not_grow_the_process_without_bound():
    took, after_10, after_80 = run(VARYING_STEPS, "1", "guarded")
    assert took == "True"
    # At most about one release's worth (512 MB) above the 10th step.
    assert int(after_80) - int(after_10) < 700


FRAGMENTS = """
import torch
from rlhf.config_sections import KernelsConfig
from rlhf.kernels.host_memory import release_fragments, tune_host_memory
def rss_mb():
    with open("/proc/self/status") as status:
        return int(next(l for l in status if l.startswith("VmRSS")).split()[1]) // 1024
assert tune_host_memory() and not release_fragments()  # the first call takes the baseline
blocks, pins = [], []
# 1 MB blocks (heap-resident), each followed by a 256 KB survivor: a survivor that size cannot
# land in the small free holes an import leaves, so it sits between two blocks.
for _ in range(800):
    blocks.append(torch.ones(256 * 1024))
    pins.append(torch.ones(64 * 1024))
steady = release_fragments()  # nothing freed yet
held = rss_mb()
del blocks  # ~800 MB of free heap below the survivors, which the heap cannot trim
print(steady, release_fragments(), held - rss_mb(), release_fragments())
"""


def test_fragmented_free_heap_is_handed_back():
    steady, released, dropped_mb, again = run(FRAGMENTS, "1")
    assert (steady, released, again) == ("False", "True", "False")
    assert int(dropped_mb) > 500


HUGE_PAGES = """
import resource, sys
import torch
from rlhf.config_sections import KernelsConfig
from rlhf.kernels.host_memory import advise_huge_pages, tune_host_memory
tune_host_memory(KernelsConfig().effective().tune_host_memory)
def vm_flags(address):
    with open("/proc/self/smaps") as smaps:
        inside = False
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                low, high = (int(part, 16) for part in head.split("-"))
                inside = low <= address < high
            elif inside and head == "VmFlags:":
                return line.split()[1:]
def faults_to_fill(block):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block.fill_(1)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
torch.set_num_threads(1)
advised, plain = torch.empty(64 << 20, dtype=torch.uint8), torch.empty(64 << 20, dtype=torch.uint8)
took = advise_huge_pages(advised)
middle = advised.data_ptr() + (32 << 20)
print(took, "hg" in vm_flags(middle), "hg" in vm_flags(plain.data_ptr() + (32 << 20)),
      advise_huge_pages(torch.empty(1 << 20, dtype=torch.uint8)), faults_to_fill(advised), faults_to_fill(plain))
"""


def test_fresh_large_blocks_are_advised_into_huge_pages():
    took, flagged, plain_flagged, small, advised_faults, plain_faults = run(HUGE_PAGES, "1")
    assert (took, flagged, plain_flagged, small) == ("True", "True", "False", "False")
    thp = open("/sys/kernel/mm/transparent_hugepage/enabled").read() if os.path.exists(
        "/sys/kernel/mm/transparent_hugepage/enabled") else "[never]"
    if "[never]" not in thp:
        # 2 MB faults inside, 4 KB ones only in the block's unaligned ends (at most 2 x 512):
        # ~560 against 16,384 for 64 MB.
        assert int(advised_faults) * 10 < int(plain_faults), (advised_faults, plain_faults)
    assert run(HUGE_PAGES, "0")[:2] == ["False", "False"]  # RLHF_TUNE_HOST_MEMORY=0: no advice
