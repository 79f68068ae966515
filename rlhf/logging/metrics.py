"""Metrics of a run: always appended to `<run_dir>/metrics.jsonl` (rank 0 only)."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator, TypeVar

from tqdm import tqdm

T = TypeVar("T")


class MetricsWriter:
    def __init__(self, run_dir: str | Path, enabled: bool = True, resume_step: int = 0):
        """A fresh run (resume_step 0) starts a new file; a resumed one keeps the rows up to
        its checkpoint's step, since later steps are about to be run again."""
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        self._start = time.time()
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [row for row in read_metrics(run_dir) if row["step"] <= resume_step] if resume_step else []
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(json.dumps(row) + "\n" for row in kept), encoding="utf-8")
        tmp.replace(self.path)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": round(time.time() - self._start, 3)}
        row.update({k: (v if isinstance(v, (int, str)) or math.isfinite(v) else str(v)) for k, v in metrics.items()})
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


class Progress:
    """A tqdm bar on a terminal; plain log lines every `every` steps otherwise (CI, files)."""

    def __init__(self, total: int, desc: str, enabled: bool = True, initial: int = 0, every: int = 10):
        self.tty = sys.stderr.isatty()
        self.enabled = enabled
        self.total, self.desc, self.every = total, desc, every
        self.count = initial
        self._start = time.time()
        self.bar = tqdm(total=total, desc=desc, initial=initial, dynamic_ncols=True) if enabled and self.tty else None

    def update(self, postfix: dict[str, float] | None = None) -> None:
        self.count += 1
        if self.bar is not None:
            self.bar.update(1)
            if postfix:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)
        elif self.enabled and (self.count % self.every == 0 or self.count == self.total):
            rate = self.count / max(time.time() - self._start, 1e-9)
            eta = (self.total - self.count) / max(rate, 1e-9)
            extra = " ".join(f"{k}={v:.4g}" for k, v in (postfix or {}).items())
            print(f"{self.desc} {self.count}/{self.total} {rate:.2f} it/s eta {eta:.0f}s {extra}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def progress_iter(items: Iterable[T], total: int, desc: str, enabled: bool = True) -> Iterator[T]:
    bar = Progress(total, desc, enabled)
    for item in items:
        yield item
        bar.update()
    bar.close()
