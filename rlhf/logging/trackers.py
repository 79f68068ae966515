"""Where a run's numbers go: the always-on JSONL files, TensorBoard and Weights & Biases.

Every tracker takes the same three calls: `log(step, metrics)` for scalars, `log_table(name,
step, rows)` for a few example rows (prompts, answers, scores) and `finish()`. `MetricsWriter`
(metrics.py) fans each call out to the trackers `logging.backends` asks for, on rank 0 only.

W&B runs offline unless told otherwise: no account, no network, the run is written under
`<run_dir>/wandb/offline-run-*` and can be uploaded later with `wandb sync DIR`. One W&B run
per stage (job_type = the stage), grouped by `logging.group` (a pipeline id), with the
resolved config, secrets removed, as the run's config.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Sequence

from rlhf.config_sections import LoggingConfig

SAMPLES_FILE = "samples.jsonl"
_SECRET_KEY = re.compile(r"(^|[_.-])(api_?key|token|secret|password|passwd|credentials?|auth|access_key)($|[_.-])", re.I)
_SECRET_ENV = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|AUTH", re.I)
REDACTED = "***"


class Tracker(ABC):
    @abstractmethod
    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Scalars of one step; names are namespaced (sft/..., perf/..., eval/...)."""

    @abstractmethod
    def log_table(self, name: str, step: int, rows: Sequence[dict[str, Any]]) -> None:
        """A few rows with the same keys (text, numbers), e.g. sampled answers and their scores."""

    def finish(self) -> None:
        """Flush and close; the tracker is not used afterwards."""


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class JsonlTracker(Tracker):
    """`metrics.jsonl`: one row {"step", "time", ...metrics} per log call; `samples.jsonl`: one
    row {"table", "step", ...row} per table row. A fresh run (resume_step 0) starts both files
    anew; a resumed one keeps the rows up to its checkpoint's step, which are about to be
    written again."""

    def __init__(self, run_dir: str | Path, resume_step: int = 0):
        run_dir = Path(run_dir)
        self.path = run_dir / "metrics.jsonl"
        self.samples_path = run_dir / SAMPLES_FILE
        self._start = time.time()
        run_dir.mkdir(parents=True, exist_ok=True)
        self._keep_until(self.path, resume_step)
        if resume_step and self.samples_path.exists():
            self._keep_until(self.samples_path, resume_step)
        else:
            self.samples_path.unlink(missing_ok=True)  # created by the first table

    @staticmethod
    def _keep_until(path: Path, step: int) -> None:
        kept = [r for r in read_jsonl(path) if r.get("step", r.get("iteration", 0)) <= step] if step else []
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(json.dumps(row) + "\n" for row in kept), encoding="utf-8")
        tmp.replace(path)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        row = {"step": step, "time": round(time.time() - self._start, 3)}
        row.update({k: _json_value(v) for k, v in metrics.items()})
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")

    def log_table(self, name: str, step: int, rows: Sequence[dict[str, Any]]) -> None:
        with self.samples_path.open("a", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps({"table": name, "step": step, **{k: _json_value(v) for k, v in row.items()}}) + "\n")


def _columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    return list(columns)


def markdown_table(rows: Sequence[dict[str, Any]], max_chars: int = 200) -> str:
    columns = _columns(rows)

    def cell(value: Any) -> str:
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        text = text.replace("|", "\\|").replace("\n", " ")
        return text if len(text) <= max_chars else text[: max_chars - 1] + "…"

    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


class TensorBoardTracker(Tracker):
    """Scalars into `<run_dir>/tensorboard` (one tag per metric name, so TensorBoard groups
    them by namespace); tables as Markdown text. A fresh run removes the previous run's event
    files; a resumed one purges events after its checkpoint's step."""

    def __init__(self, run_dir: str | Path, resume_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        log_dir = Path(run_dir) / "tensorboard"
        if not resume_step and log_dir.is_dir():
            for old in log_dir.glob("events.out.tfevents.*"):
                old.unlink()
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=resume_step + 1 if resume_step else None)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        for key, value in _scalars(metrics).items():
            self.writer.add_scalar(key, value, step)

    def log_table(self, name: str, step: int, rows: Sequence[dict[str, Any]]) -> None:
        if rows:
            self.writer.add_text(name, markdown_table(rows), step)

    def finish(self) -> None:
        self.writer.close()


def _secret_env_values() -> list[str]:
    return sorted((v for k, v in os.environ.items() if _SECRET_ENV.search(k) and len(v) >= 8), key=len, reverse=True)


def public_config(config: Any) -> dict:
    """The config as a plain dict with secrets removed: values under secret-looking keys
    (api_key, token, password, ...) and any text equal to or containing the value of a
    secret-looking environment variable (WANDB_API_KEY, HF_TOKEN, ...)."""
    if config is None:
        return {}
    data = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    secrets = _secret_env_values()

    def clean(value: Any, key: str = "") -> Any:
        if key and _SECRET_KEY.search(key) and value not in (None, ""):
            return REDACTED
        if isinstance(value, dict):
            return {k: clean(v, str(k)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        if isinstance(value, str):
            for secret in secrets:
                value = value.replace(secret, REDACTED)
        return value

    return clean(data)


class WandbTracker(Tracker):
    """One W&B run per stage under `<run_dir>/wandb`. Mode: WANDB_MODE when set, else
    `logging.wandb_mode`, else offline."""

    def __init__(self, run_dir: str | Path, cfg: LoggingConfig, stage: str, config: Any = None):
        import wandb

        run_dir = Path(run_dir).resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
        mode = None if os.environ.get("WANDB_MODE") else (cfg.wandb_mode or "offline")
        self._wandb = wandb
        # The mode also goes to W&B's process-wide settings: its background telemetry reads
        # those, not the run's, and would otherwise try to reach the network in offline mode.
        wandb.setup(settings=wandb.Settings(mode=mode or os.environ["WANDB_MODE"]))
        self.run = wandb.init(
            project=cfg.project,
            name=cfg.run_name or (f"{run_dir.parent.name}-{run_dir.name}" if run_dir.name == stage else run_dir.name),
            group=cfg.group,
            job_type=stage or None,
            config=public_config(config),
            dir=str(run_dir),
            mode=mode,
            reinit="finish_previous",
        )

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self.run.log(_scalars(metrics), step=step)

    def log_table(self, name: str, step: int, rows: Sequence[dict[str, Any]]) -> None:
        if not rows:
            return
        columns = _columns(rows)
        data = [[row.get(c) for c in columns] for row in rows]
        self.run.log({name: self._wandb.Table(columns=columns, data=data)}, step=step)

    def finish(self) -> None:
        self.run.finish()


def build_trackers(run_dir: str | Path, cfg: LoggingConfig | None = None, stage: str = "", config: Any = None,
                   resume_step: int = 0) -> list[Tracker]:
    """The JSONL tracker, then one per entry of `cfg.backends`."""
    trackers: list[Tracker] = [JsonlTracker(run_dir, resume_step)]
    for backend in cfg.backends if cfg is not None else ():
        if backend == "tensorboard":
            trackers.append(TensorBoardTracker(run_dir, resume_step))
        elif backend == "wandb":
            trackers.append(WandbTracker(run_dir, cfg, stage, config))
    return trackers
