"""Metrics of a run: always appended to `<run_dir>/metrics.jsonl` (rank 0 only), and to the
trackers the logging config names; progress bars for long loops."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence, TypeVar

import torch
from tqdm import tqdm

from rlhf.config_sections import LoggingConfig
from rlhf.logging.perf import PerfMeter
from rlhf.logging.trackers import SAMPLES_FILE, Tracker, build_trackers, read_jsonl

T = TypeVar("T")


class MetricsWriter:
    def __init__(
        self,
        run_dir: str | Path,
        enabled: bool = True,
        resume_step: int = 0,
        logging: LoggingConfig | None = None,
        stage: str = "",
        config: Any = None,
        models: Sequence[torch.nn.Module] = (),
        compute_dtype: torch.dtype | None = None,
    ):
        """Writes a run's metrics and tables to metrics.jsonl / samples.jsonl and to the trackers
        `logging.backends` names (see trackers.py); on rank 0 only (`enabled`).

        A fresh run (resume_step 0) starts new files; a resumed one keeps the rows up to its
        checkpoint's step, since later steps are about to be run again. `stage` is the W&B
        job type and `config` the resolved stage config (logged without secrets). Given
        `models`, every row also gets perf/mfu and perf/peak_memory_gb (see perf.py), MFU against
        the peak of `compute_dtype` (the run's, None: fp32)."""
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.trackers: list[Tracker] = []
        self.perf: PerfMeter | None = None
        if not enabled:
            return
        self.trackers = build_trackers(run_dir, logging, stage, config, resume_step)
        if models:
            self.perf = PerfMeter(models, logging.peak_flops if logging is not None else None, compute_dtype)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = dict(metrics)
        if self.perf is not None:
            row.update(self.perf.take())
        for tracker in self.trackers:
            tracker.log(step, row)

    def log_table(self, name: str, step: int, rows: Sequence[dict[str, Any]]) -> None:
        """A few example rows (e.g. prompt, response, reward) under `name` at `step`."""
        if not self.enabled:
            return
        rows = list(rows)
        for tracker in self.trackers:
            tracker.log_table(name, step, rows)

    def finish(self) -> None:
        """Close the trackers (W&B run, TensorBoard writer) and remove the perf hooks."""
        if self.perf is not None:
            self.perf.close()
            self.perf = None
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []
        self.enabled = False


def read_metrics(run_dir: str | Path) -> list[dict]:
    return read_jsonl(Path(run_dir) / "metrics.jsonl")


def read_samples(run_dir: str | Path, table: str | None = None) -> list[dict]:
    """Rows of samples.jsonl, optionally of one table (e.g. "eval/samples")."""
    rows = read_jsonl(Path(run_dir) / SAMPLES_FILE)
    return [r for r in rows if table is None or r.get("table") == table]


class Progress:
    """A tqdm bar on a terminal; plain log lines otherwise (CI, files, Ray workers): at a
    multiple of `every` steps once `interval` seconds have passed since the last line, and at
    the end, so a stage says where it is about twice a minute whatever its speed."""

    def __init__(self, total: int, desc: str, enabled: bool = True, initial: int = 0, every: int = 10,
                 interval: float = 30.0):
        self.tty = sys.stderr.isatty()
        self.enabled = enabled
        self.total, self.desc, self.every, self.interval = total, desc, every, interval
        self.count = initial
        self._start = self._last_line = time.time()
        self.bar = tqdm(total=total, desc=desc, initial=initial, dynamic_ncols=True) if enabled and self.tty else None

    def update(self, postfix: dict[str, float] | None = None) -> None:
        self.count += 1
        if self.bar is not None:
            self.bar.update(1)
            if postfix:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)
        elif self.enabled and (self.count == self.total or (
                self.count % self.every == 0 and time.time() - self._last_line >= self.interval)):
            self._last_line = time.time()
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
