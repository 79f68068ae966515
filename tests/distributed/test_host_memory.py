"""Freed host memory is reused: after `keep_host_memory`, allocating and freeing the same large
tensors again costs no page faults; RLHF_KEEP_HOST_MEMORY=0 leaves malloc alone."""

import os
import platform
import subprocess
import sys

import pytest

SCRIPT = """
import resource, torch
from rlhf.distributed.host_memory import keep_host_memory
took = keep_host_memory()
def churn():
    for _ in range(5):
        blocks = [torch.ones(16 * 1024 * 1024) for _ in range(3)]  # 64 MB each, written through
        del blocks
churn()  # the first rounds fault their pages in either way
churn()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
churn()
print(took, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(keep: str) -> tuple[str, int]:
    env = {**os.environ, "RLHF_KEEP_HOST_MEMORY": keep}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True)
    took, count = out.stdout.split()
    return took, int(count)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_freed_blocks_are_reused_without_page_faults():
    kept, kept_faults = faults("1")
    plain, plain_faults = faults("0")
    assert (kept, plain) == ("True", "False")
    # 15 blocks of 64 MB are 245,760 fresh 4 KB pages when every block is a new mmap.
    assert plain_faults > 100_000
    assert kept_faults < plain_faults / 10
