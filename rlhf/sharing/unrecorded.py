"""What a stage run started directly (`rlhf sft --config ...`, no lineage.json) can still tell
about itself: its stage, read from the shape of its saved config; its data files, hashed now;
when it finished; and its summary numbers. Only `rlhf pipeline` records hashes at training
time, so these are facts at export time."""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Optional

from rlhf.lineage import data_hash

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "rlhf_summary.json"


def stage_of(config: dict, stages: Mapping[str, Any]) -> Optional[str]:
    """The stage whose config class has every top-level key of `config`, the one with the
    fewest other fields when several do (an SFT config also fits the RM's fields, which add
    `loss`); None when no class has them all. A config saved by an older version that lacked a
    section still fits; one with a key no stage knows does not."""
    keys = set(config)
    fits = []
    for name, stage in stages.items():
        config_class = getattr(stage, "config", None)
        if config_class is None or not dataclasses.is_dataclass(config_class):
            continue
        fields = {f.name for f in dataclasses.fields(config_class)}
        if keys <= fields:
            fits.append((len(fields - keys), name))
    fits.sort()
    if not fits or (len(fits) > 1 and fits[0][0] == fits[1][0]):
        return None  # none, or two stages fit equally: better to say so than to guess
    return fits[0][1]


def hash_inputs(config: dict, keys: tuple[str, ...]) -> dict[str, str]:
    """Config key -> `data_hash` now, for each data source among `keys` that the config names
    (the same keys the pipeline hashes into a lineage)."""
    out = {}
    for key in keys:
        node: Any = config
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        path = node.get("path") if isinstance(node, dict) else None
        if not path:
            continue
        out[key] = data_hash(str(path))
    return out


def finished_at(marker: Path) -> str:
    """When the stage wrote `marker` (its finished config), as the lineage writes times."""
    stamp = datetime.fromtimestamp(marker.stat().st_mtime, timezone.utc)
    return stamp.isoformat(timespec="seconds")


def summary_metrics(run_dir: Path) -> tuple[dict[str, float], str]:
    """The numbers the pipeline's lineage would have recorded, and where they came from: the
    stage's summary saved with the export (model/rlhf_summary.json; for a reward model, the
    exported best step's, which the last rows of metrics.jsonl need not be), else the last
    held-out (eval/...) values in metrics.jsonl, else none."""
    try:
        summary = json.loads((run_dir / "model" / SUMMARY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        summary = None
    if isinstance(summary, dict):
        numbers = {k: float(v) for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if numbers:
            return numbers, f"model/{SUMMARY_FILE}, saved with the export"
    last = last_eval_metrics(run_dir)
    return last, f"the last of each in its {METRICS_FILE}" if last else ""


def last_eval_metrics(run_dir: Path) -> dict[str, float]:
    """The last value of each held-out (eval/...) number in the run's metrics.jsonl; {} when it
    is absent. Unreadable lines are passed over: the numbers are informative, not the export."""
    values: dict[str, float] = {}
    try:
        lines = (run_dir / METRICS_FILE).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return values
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if not isinstance(row, dict):
            continue
        for key, value in row.items():
            if key.startswith("eval/") and isinstance(value, (int, float)) and not isinstance(value, bool):
                values[key] = float(value)
    return values
