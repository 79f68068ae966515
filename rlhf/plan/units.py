"""Units of the plan and how its numbers read as text: bytes in GiB or MiB, parameter counts
in billions or millions."""

from __future__ import annotations

GiB = 2**30


def size(nbytes: int) -> str:
    """Bytes for text: GiB, or MiB below a tenth of a GiB."""
    return f"{nbytes / GiB:.2f} GiB" if nbytes >= GiB / 10 else f"{nbytes / 2**20:.1f} MiB"


def count(n: int) -> str:
    """A parameter count for text: billions, millions, or the exact number below a million."""
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n:,}"
