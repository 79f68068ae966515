"""Host memory for CPU training: freed blocks reused by the next step, growth bounded.

PyTorch's CPU allocator is plain `malloc` (`posix_memalign`). With glibc's defaults the mmap
threshold starts at 128 KB and only rises as mapped blocks are freed, and free heap above twice
it is trimmed, so blocks of a few MB (a layer's activations, an RM step's attention weights, a
decode call's packed weights) keep coming back as fresh pages that the kernel faults in and
zeroes. `tune_host_memory` fixes the threshold at 32 MB, glibc's own ceiling, and keeps up to
1 GB of free heap between steps: blocks under 32 MB reuse the previous step's pages; larger ones
(vocabulary-sized logits and gradients) stay their own mappings, returned on free, as with the
defaults.

Keeping every block in the heap (no mmap at all, as an earlier version did) also removed the
faults of the large blocks, but steps that change shape fragment glibc's heap: a freed block of
exactly N bytes cannot serve the next 64-byte-aligned request for N bytes once a small survivor
sits next to it, and SmolLM2 SFT's resident memory grew steadily, by about one vocabulary-sized
block per step, with no bound. Blocks of 32 MB and more no longer enter the heap;
`release_fragments`, called after every optimizer step, is the backstop for the smaller ones:
whenever another 512 MB has come to lie free below the heap's top it hands those pages back to
the kernel, so fragmentation costs page faults, never unbounded memory.

Tried and not kept: PyTorch's `THP_MEM_ALLOC_ENABLE` with every block of 2 MB and more
mapped on its own made SFT steps faster (huge pages fault cheaply), but each mid-size
temporary became a fresh zeroed mapping, which made the tiny RM step and SmolLM2 decode
clearly slower (BENCHMARKS.md, item 13 and 'Measurements behind the code').

The vocabulary-sized blocks that a step makes afresh (the fused head's weight gradient,
rlhf/kernels/linear_cross_entropy.py) are advised into transparent huge pages with
`advise_huge_pages` before first use: one fault per 2 MB page instead of one per 4 KB page,
a few dozen instead of tens of thousands for SmolLM2's 113 MB block. Only such whole mappings
are advised, never heap blocks, so the mid-size temporaries keep reusing the pages of the step
before.

`kernels.tune_host_memory: false` (or `RLHF_TUNE_HOST_MEMORY=0`) leaves glibc's defaults and
advises nothing. Nothing changes where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024
"""Blocks of this size and more are their own mappings (glibc's ceiling for its adaptive one)."""
TRIM_THRESHOLD = 1024 * 1024 * 1024
"""Free space at the heap's top kept for the next step before trimming."""
FRAGMENT_LIMIT = 512 * 1024 * 1024
"""Free heap space below the top beyond which `release_fragments` returns its pages."""
HUGE_PAGE = 2 * 1024 * 1024
"""x86-64's transparent huge page."""
_MADV_HUGEPAGE = 14


_tuned: list[bool] = []
"""Empty until `tune_host_memory` ran in this process, then whether it took effect."""


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # glibc only: musl and others have no mallopt of this meaning
    except (OSError, AttributeError):
        return None
    if hasattr(libc, "mallinfo2"):  # glibc 2.33 and later
        libc.mallinfo2.restype = _MallInfo2
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return libc


def tune_host_memory(enabled: bool = True) -> bool:
    """Set glibc's malloc as the module doc says, once per process (later calls return the
    first one's outcome); True when it took effect."""
    if not _tuned:
        libc = _glibc()
        _tuned.append(enabled and libc is not None
                      and bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
                      and bool(libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)))
    return _tuned[0]


def free_heap_below_top() -> int:
    """Bytes in free heap blocks other than the heap's top (what fragmentation holds)."""
    libc = _glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):  # glibc before 2.33
        return 0
    info = libc.mallinfo2()
    return max(0, info.fordblks - info.keepcost)


_free_at_last_release: list[int] = []


def release_fragments() -> bool:
    """After `tune_host_memory`: once the free heap blocks below the top have grown by more
    than FRAGMENT_LIMIT bytes since the first call (or the last release), give their pages back
    to the kernel; True when it did. A steady run never triggers it; the check is cheap."""
    if not _tuned or not _tuned[0]:
        return False
    free = free_heap_below_top()
    if not _free_at_last_release:
        _free_at_last_release.append(free)
        return False
    if free - _free_at_last_release[0] <= FRAGMENT_LIMIT:
        return False
    _glibc().malloc_trim(0)
    _free_at_last_release[0] = free
    return True


def advise_huge_pages(tensor: torch.Tensor) -> bool:
    """Ask for transparent huge pages under a fresh CPU block of MMAP_THRESHOLD bytes or more
    (glibc maps such blocks on their own, tuned or not) before anything is written to it; True
    when the kernel took the advice. Its whole 2 MB pages are covered; heap blocks never are."""
    storage = tensor.untyped_storage()
    if tensor.device.type != "cpu" or storage.nbytes() < MMAP_THRESHOLD or not (_tuned and _tuned[0]):
        return False
    start = -(-storage.data_ptr() // HUGE_PAGE) * HUGE_PAGE
    end = (storage.data_ptr() + storage.nbytes()) // HUGE_PAGE * HUGE_PAGE
    return end > start and _glibc().madvise(start, end - start, _MADV_HUGEPAGE) == 0


def return_free_heap() -> bool:
    """Hand every free heap page back to the kernel now (glibc's malloc_trim(0)); True when
    some were. For one-off phases that free much more than a step reuses: loading a model
    frees each layer's or tensor's temporary copy, blocks under MMAP_THRESHOLD that would
    otherwise stay in the resident set (up to TRIM_THRESHOLD of them once tuned)."""
    libc = _glibc()
    return bool(libc.malloc_trim(0)) if libc is not None else False
