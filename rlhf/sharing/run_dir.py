"""What a finished run directory holds, read back for sharing: its stage, lineage, saved config,
the chain of runs it was trained from, and each data file it read.

Accepts a stage's run directory (e.g. runs/quickstart/ppo: model/, lineage.json, config.yaml) or
a pipeline's output directory (runs/quickstart), from which it picks the last stage. A stage run
started directly has no lineage.json: given the stage registry, its finished export and saved
config stand in, and what the lineage would have recorded is taken at export time
(unrecorded.py).
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import yaml

from rlhf.errors import UserError
from rlhf.lineage import LINEAGE_FILE, Lineage, artifact_complete, data_hash, read_lineage
from rlhf.sharing.unrecorded import finished_at, hash_inputs, stage_of, summary_metrics

CONFIG_FILE = "config.yaml"
FINISHED_CONFIG = Path("model") / "rlhf_config.yaml"  # the same config, written when the stage finished
PIPELINE_FILE = "pipeline.yaml"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_CACHE = re.compile(r"models--([^/]+)--([^/]+)/snapshots/")
MODEL_KEYS = ("model.path", "reward_model.path", "reference.path")
"""Config keys naming a model a run started from or used; a run started directly knows its
parents only through these."""


@dataclass
class StageRun:
    """One finished stage: its directory, lineage and saved config (a plain dict)."""

    dir: Path
    lineage: Lineage
    config: dict
    direct: bool = False
    """Started directly, without lineage.json: `lineage` was built at export time (data hashed
    now, metrics from the run's summary, no code version, no lineage id)."""
    metrics_source: str = ""
    """Where a direct run's metrics were read from, for the card."""
    given: list["Parent"] = field(default_factory=list)
    """A direct run's parents: the finished runs whose model/ its config's model paths name."""

    @property
    def stage(self) -> str:
        return self.lineage.stage

    @property
    def model_dir(self) -> Path:
        return self.dir / "model"

    @property
    def finished_file(self) -> Path:
        """Written last when the run finished: lineage.json, or a direct run's finished config."""
        return self.dir / (FINISHED_CONFIG if self.direct else LINEAGE_FILE)


@dataclass
class Parent:
    """A run this one was trained from, as the lineage names it."""

    role: str
    """The lineage's name for it: "sft", "rm", ..."""
    run: Optional[StageRun]
    """None when its directory or lineage is gone."""
    current: Optional[bool]
    """Whether its lineage id is still the one recorded when this run was trained; None when
    this run recorded none (it was started directly)."""


@dataclass
class DataInput:
    stage: str
    key: str
    """The config key, e.g. data.prompts."""
    path: str
    sha256: str
    """From the lineage (for a hub id: the hash of the id)."""
    rows: Optional[int]
    """Counted from the file when it still has the recorded hash; None otherwise."""
    note: str = ""
    at_export: bool = False
    """`sha256` was computed at export time, not recorded at training (a direct run)."""


@dataclass
class Located:
    run: StageRun
    picked: str = ""
    """How a pipeline directory was narrowed to this stage ("" for a stage directory)."""
    chain: list[Parent] = field(default_factory=list)


def locate(path: str | Path, stages: Optional[Mapping[str, Any]] = None) -> Located:
    """The finished stage at `path` (a stage's run directory or a pipeline's output directory);
    a `UserError` naming what is missing otherwise. `stages`: the stage registry (name -> entry
    with `config` and `inputs`), without which a run started directly is refused."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such run directory")
    if not path.is_dir():
        raise UserError(f"{path}: not a directory (give a stage's run directory, e.g. runs/quickstart/ppo)")
    if (path / LINEAGE_FILE).exists() or (path / "model").is_dir():
        return Located(read_stage(path, stages))
    return _pick_from_pipeline(path)


def read_stage(path: Path, stages: Optional[Mapping[str, Any]] = None) -> StageRun:
    if not (path / LINEAGE_FILE).exists() and (path / FINISHED_CONFIG).is_file():
        if stages is None:  # a caller of the library, not a user: the CLI always passes the registry
            raise UserError(f"{path}: no {LINEAGE_FILE}; a run started directly is read with the stage registry "
                            "(export_run(..., stages=STAGES))")
        return read_direct(path, stages)
    lineage = read_lineage(path)
    if lineage is None:
        if (path / LINEAGE_FILE).exists():
            raise UserError(f"{path}: unreadable {LINEAGE_FILE}, so no finished export to share (rlhf pipeline writes "
                            "it after a stage's export is complete; a run that is still going or was stopped has none)")
        raise UserError(f"{path}: no {LINEAGE_FILE}, so no finished export to share (nor {FINISHED_CONFIG}: a stage "
                        f"writes that when it finishes, rlhf pipeline {LINEAGE_FILE} after it; a run that is still "
                        "going or was stopped has neither)")
    complete, why = artifact_complete(path / "model")
    if not complete:
        raise UserError(f"{path}: the model export is incomplete ({why})")
    return StageRun(path, lineage, read_config(path))


def read_direct(path: Path, stages: Mapping[str, Any], seen: frozenset = frozenset()) -> StageRun:
    """A finished run started directly (its finished config there, no lineage.json): the
    lineage it would have had, built now from that config, its data files and its summary."""
    complete, why = artifact_complete(path / "model")
    if not complete:
        raise UserError(f"{path}: the model export is incomplete ({why})")
    # The finished config, not config.yaml: a run started again there with --overwrite rewrites
    # config.yaml at once, while this one was saved with the export being shared.
    config = _read_yaml(path / FINISHED_CONFIG)
    stage = stage_of(config, stages)
    if stage is None:
        raise UserError(f"{path / FINISHED_CONFIG}: cannot tell which stage wrote this config (its top-level keys "
                        f"{', '.join(sorted(config))} fit no single stage's config)")
    keys = tuple(getattr(stages[stage], "inputs", ()))
    metrics, source = summary_metrics(path)
    lineage = Lineage(stage, "", hash_inputs(config, keys), {}, code={}, metrics=metrics,
                      created=finished_at(path / FINISHED_CONFIG))
    run = StageRun(path, lineage, config, direct=True, metrics_source=source)
    run.given = _given_runs(run, stages, seen | {path.resolve()})
    return run


def _given_runs(run: StageRun, stages: Mapping[str, Any], seen: frozenset) -> list[Parent]:
    """The finished runs whose exports the config's model paths name, read as the chain needs
    them: by their lineage when they have one, else as direct runs. One that cannot be read is
    left out; the card then names the path as it is."""
    parents: list[Parent] = []
    for key in MODEL_KEYS:
        given = lookup(run.config, key)
        if not isinstance(given, str) or not given:
            continue
        model = Path(given).expanduser()
        candidate = model.parent
        try:
            resolved = candidate.resolve()
        except OSError:
            continue
        if model.name != "model" or resolved in seen or any(p.run.dir.resolve() == resolved for p in parents):
            continue
        parent: Optional[StageRun] = None
        if (candidate / LINEAGE_FILE).exists():
            lineage = read_lineage(candidate)
            if lineage is not None:
                try:
                    config = read_config(candidate)
                except UserError:
                    config = {}
                parent = StageRun(candidate, lineage, config)
        elif (candidate / FINISHED_CONFIG).is_file():
            try:
                parent = read_direct(candidate, stages, seen)
            except UserError:
                parent = None
        if parent is not None:
            parents.append(Parent(parent.stage, parent, None))
    return parents


def read_config(path: Path) -> dict:
    for name in (CONFIG_FILE, FINISHED_CONFIG):
        file = path / name
        if file.is_file():
            return _read_yaml(file)
    raise UserError(f"{path}: no {CONFIG_FILE} (the stage's saved config)")


def _read_yaml(file: Path) -> dict:
    try:
        config = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UserError(f"{file}: not readable YAML ({str(exc).splitlines()[0]})") from None
    except OSError as exc:
        raise UserError(f"{file}: cannot be read ({exc.strerror or exc})") from None
    if not isinstance(config, dict):
        raise UserError(f"{file}: expected a mapping of config keys, got {type(config).__name__}")
    return config


def _pick_from_pipeline(path: Path) -> Located:
    finished = [d.name for d in sorted(path.iterdir()) if (d / LINEAGE_FILE).is_file()]
    order = _pipeline_stages(path)
    if order:
        last = order[-1]
        if last not in finished:
            raise UserError(f"{path}: the pipeline's last stage {last} has no finished export ({path / last / LINEAGE_FILE} "
                            f"missing); finished stages: {', '.join(finished) or 'none'} (pass one, e.g. "
                            f"{path / (finished[-1] if finished else last)})")
        return Located(read_stage(path / last), picked=f"{last}, the last stage of the pipeline in {path}")
    if len(finished) == 1:
        return Located(read_stage(path / finished[0]), picked=f"{finished[0]}, the only finished stage in {path}")
    found = ", ".join(finished) if finished else "none"
    raise UserError(f"{path}: neither a stage's run directory ({LINEAGE_FILE} and model/) nor a pipeline's output "
                    f"({PIPELINE_FILE}); stages found: {found}" + (" (pass one of them)" if finished else ""))


def _pipeline_stages(path: Path) -> list[str]:
    try:
        stages = yaml.safe_load((path / PIPELINE_FILE).read_text(encoding="utf-8")).get("stages")
    except (OSError, yaml.YAMLError, UnicodeDecodeError, AttributeError):
        return []
    return [str(s) for s in stages] if isinstance(stages, list) else []


def lookup(config: dict, dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def trained_from(run: StageRun) -> list[Parent]:
    """The runs named in `run`'s lineage as parents, read from the directories beside it (for a
    direct run: those its model paths name)."""
    if run.direct:
        return run.given
    parents = []
    for role, lineage_id in run.lineage.parents.items():
        sibling = run.dir.parent / role
        stored = read_lineage(sibling)
        if stored is None:
            parents.append(Parent(role, None, False))
            continue
        try:
            config = read_config(sibling)
        except UserError:
            config = {}
        parents.append(Parent(role, StageRun(sibling, stored, config), stored.lineage_id == lineage_id))
    return parents


def policy_parent(run: StageRun, parents: list[Parent]) -> Optional[Parent]:
    """The parent whose export `run`'s model started from (model.path), if any."""
    start = lookup(run.config, "model.path")
    for parent in parents:
        if parent.run is not None and start and _same_path(start, parent.run.model_dir):
            return parent
    return None


def chain(run: StageRun) -> list[Parent]:
    """The runs the model descends from, newest first: PPO -> [SFT], SFT -> []."""
    out: list[Parent] = []
    current, seen = run, {run.dir.resolve()}
    while True:
        parent = policy_parent(current, trained_from(current))
        if parent is None or parent.run.dir.resolve() in seen:
            return out
        out.append(parent)
        seen.add(parent.run.dir.resolve())
        current = parent.run


def _same_path(a: str, b: Path) -> bool:
    try:
        return Path(a).expanduser().resolve() == b.resolve()
    except OSError:
        return False


def hub_id(path: str) -> Optional[str]:
    """The hub repository a model path names: itself when it is an `owner/name` id that is no
    local path, or the id inside a hub cache snapshot path."""
    if not path:
        return None
    cached = _HUB_CACHE.search(Path(path).as_posix())
    if cached:
        return f"{cached.group(1)}/{cached.group(2)}"
    if not Path(path).expanduser().exists() and _HUB_ID.match(path):
        return path
    return None


def data_inputs(run: StageRun) -> list[DataInput]:
    """Each data source in `run`'s lineage (model paths excluded) with the recorded hash (a
    direct run's: hashed at export), and its row count when the file there now still has that
    hash."""
    rows = []
    for key, recorded in run.lineage.inputs.items():
        if key.endswith(".path"):  # a model the user gave (model.path, reward_model.path)
            continue
        node = lookup(run.config, key)
        path = node.get("path", "") if isinstance(node, dict) else str(node or "")
        local = Path(path).expanduser()
        if not local.exists():
            note = "hub dataset (only its id is hashed)" if hub_id(path) else "file no longer there"
            if run.direct and not hub_id(path):
                recorded = ""  # hashed now it would be the hash of its name, not of any data
            rows.append(DataInput(run.stage, key, path, recorded, None, note, run.direct))
        elif data_hash(path) != recorded:
            rows.append(DataInput(run.stage, key, path, recorded, None, "changed since training", run.direct))
        else:
            rows.append(DataInput(run.stage, key, path, recorded, count_rows(local), at_export=run.direct))
    return rows


def count_rows(path: Path) -> Optional[int]:
    """Rows of a JSONL, JSON, CSV or Parquet file (None for other layouts)."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            with path.open("rb") as handle:
                return sum(1 for line in handle if line.strip())
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            return len(data) if isinstance(data, list) else None
        if suffix == ".csv":
            with path.open(newline="", encoding="utf-8") as handle:
                return max(sum(1 for _ in csv.reader(handle)) - 1, 0)
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(path).metadata.num_rows
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return None
