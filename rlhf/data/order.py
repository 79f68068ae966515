"""The seeded per-epoch order every batch source shares: it depends only on (seed, epoch),
so a resumed or sharded run can address any position of any epoch."""

from __future__ import annotations

import random


class EpochOrder:
    def __init__(self, size: int, seed: int, shuffle: bool = True):
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self._epoch: int | None = None
        self._order: list[int] = []

    def __call__(self, epoch: int) -> list[int]:
        """Indices 0..size-1 in epoch `epoch`'s order (the latest epoch is cached)."""
        if self._epoch != epoch:
            order = list(range(self.size))
            if self.shuffle:
                random.Random(self.seed * 100_003 + epoch).shuffle(order)
            self._epoch, self._order = epoch, order
        return self._order
