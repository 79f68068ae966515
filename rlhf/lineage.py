"""Artifact lineage: what produced a stage's run directory, so `rlhf pipeline` can skip work.

Each stage writes `<run_dir>/lineage.json` after its model export. It records a hash of the
stage config, hashes of the input data, the lineage ids of the parent stages (the SFT model
an RM starts from, ...), the code version and a few summary metrics. A re-run builds the
lineage it *would* write and compares it with the stored one (`check_up_to_date`): same
config, same inputs, same parents and a complete artifact mean the stage can be skipped.
Because a child records its parent's id, a changed SFT config re-runs RM and PPO too.

Only hashes are stored, never config values, so a lineage file holds no secrets.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import hashlib
import importlib.metadata
import json
import os
import subprocess
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Sequence

from rlhf.files import write_text_atomic

LINEAGE_FILE = "lineage.json"

DEFAULT_IGNORED: tuple[str, ...] = ("logging", "alarms", "train.resume", "train.save_every", "train.keep_last",
                                    "output_dir")
"""Dotted config keys that do not change what a stage produces (where it logs, which health
alarms it raises, how often it checkpoints, where it writes), so changing them must not force a
re-run (nor does a PPO run from before the `alarms` section existed)."""

_CHUNK = 1 << 20  # 1 MiB: bounded memory on multi-GB data files
_GIT_TIMEOUT_S = 5.0
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
_SHARD_INDEX = "model.safetensors.index.json"


def _json_default(value: Any) -> Any:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    # Falling back to str() would hash reprs like "<Foo at 0x7f..>", which differ every run
    # and would silently defeat skipping; better to fail loudly.
    raise TypeError(f"cannot hash a config value of type {type(value).__name__}: {value!r}")


def _canonical(obj: Any) -> bytes:
    """One byte string per value: keys sorted, no optional whitespace."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_json_default).encode(
        "utf-8"
    )


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _package_version() -> str:
    import rlhf

    version = getattr(rlhf, "__version__", None)
    if isinstance(version, str):
        return version
    try:
        return importlib.metadata.version("rlhf")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _git(args: Sequence[str], cwd: Path) -> Optional[str]:
    """stdout of a git command, or None on any failure (no git, not a checkout, timeout)."""
    # Optional locks off: `git status` may otherwise take index.lock and collide with the
    # user's own git commands running at the same time.
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}
    try:
        done = subprocess.run(
            ["git", *args],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=_GIT_TIMEOUT_S,
        )
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return done.stdout if done.returncode == 0 else None


def code_version() -> dict:
    """{"package": version, "git_commit": sha or None, "git_dirty": bool or None}.

    Git is asked in the directory of the installed `rlhf` package; it never raises.
    """
    package_dir = Path(__file__).resolve().parent
    commit = dirty = None
    # A non-editable install inside some other repository (e.g. a venv under a project dir)
    # would otherwise report that repository's commit; only trust git if it tracks the package.
    if _git(["ls-files", "--error-unmatch", "--", "__init__.py"], package_dir) is not None:
        head = _git(["rev-parse", "HEAD"], package_dir)
        commit = (head.strip() or None) if head else None
        # Untracked files are left out: run outputs inside the checkout are not code changes.
        status = _git(["status", "--porcelain", "--untracked-files=no"], package_dir)
        if commit is not None and status is not None:
            dirty = bool(status.strip())
    return {"package": _package_version(), "git_commit": commit, "git_dirty": dirty}


def _without(config: dict, dotted_keys: Sequence[str]) -> dict:
    pruned = copy.deepcopy(config)
    for dotted in dotted_keys:
        *parents, leaf = dotted.split(".")
        node: Any = pruned
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return pruned


def config_hash(config: dict, ignore: Sequence[str] = DEFAULT_IGNORED) -> str:
    """sha256 of the canonical JSON of `config` (e.g. `config_to_dict(cfg)`) without the
    dotted keys in `ignore`. Key order does not matter; `config` is not modified."""
    return _sha256(_canonical(_without(config, ignore)))


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _dir_sha256(directory: Path) -> str:
    pairs = []
    # os.walk does not follow symlinked directories, so a link cycle cannot loop forever.
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in files:
            file = Path(root, name)
            if file.is_file():
                pairs.append((file.relative_to(directory).as_posix(), _file_sha256(file)))
    # Paths are part of the hash, so renaming or moving a file changes it too.
    return _sha256(_canonical(sorted(pairs)))


def data_hash(path: str) -> str:
    """Content hash of a data source as the loaders would read it.

    A local file hashes its bytes; a local directory (`datasets.save_to_disk`) hashes its
    files' relative paths and contents; anything else is taken as a hub dataset id and only
    the id is hashed (an upstream update of the dataset goes unnoticed). "" gives "".
    """
    if not path:
        return ""
    local = Path(path).expanduser()  # the loaders expand "~" too (rlhf/data/sources.py)
    if local.is_file():
        return _file_sha256(local)
    if local.is_dir():
        return _dir_sha256(local)
    return _sha256(("hub:" + path).encode("utf-8"))


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class Lineage:
    """What one stage run was made from. Only the first four fields define its identity."""

    stage: str
    """Stage name: "sft", "rm" or "ppo"."""
    config_hash: str
    """`config_hash(config_to_dict(cfg))` of the stage config."""
    inputs: dict[str, str]
    """Config key of each data source -> `data_hash`, e.g. {"data.train": "ab12.."}."""
    parents: dict[str, str]
    """Role -> lineage id of the run this stage starts from, e.g. {"sft": "cd34.."}."""
    code: dict = field(default_factory=dict)
    """`code_version()` of the code that wrote the run; informational only."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Summary metrics of the run (e.g. final eval loss)."""
    created: str = field(default_factory=_utc_now)
    """ISO-8601 UTC time the lineage was made."""

    @property
    def lineage_id(self) -> str:
        """Hash of (stage, config_hash, inputs, parents): the same config on the same inputs
        reproduces the id, whatever code version, metrics or time the run had."""
        identity = {
            "stage": self.stage,
            "config_hash": self.config_hash,
            "inputs": self.inputs,
            "parents": self.parents,
        }
        return _sha256(_canonical(identity))

    def to_dict(self) -> dict:
        return {"lineage_id": self.lineage_id, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "Lineage":
        """Inverse of `to_dict`; `lineage_id` is recomputed, unknown keys are ignored.
        Raises ValueError when a required key is missing or has the wrong type."""
        if not isinstance(d, dict):
            raise ValueError(f"lineage must be a JSON object, got {type(d).__name__}")
        known = {f.name: f for f in dataclasses.fields(cls)}
        required = [
            name
            for name, f in known.items()
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        missing = [name for name in required if name not in d]
        if missing:
            raise ValueError(f"lineage is missing {', '.join(missing)}")
        values = {name: d[name] for name in known if name in d}
        for name in ("stage", "config_hash", "created"):
            if name in values and not isinstance(values[name], str):
                raise ValueError(f"lineage field {name} must be a string")
        for name in ("inputs", "parents"):
            table = values[name]
            if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
                raise ValueError(f"lineage field {name} must map names to hash strings")
        for name in ("code", "metrics"):
            if name in values and not isinstance(values[name], dict):
                raise ValueError(f"lineage field {name} must be an object")
        return cls(**values)


def write_lineage(run_dir: str | os.PathLike, lineage: Lineage, name: str = LINEAGE_FILE) -> Path:
    """Write `run_dir/<name>` (lineage.json by default) atomically. The pipeline writes
    lineage.json last, so its presence marks a finished stage and a crash mid-write must
    never leave a half file. Other names serve e.g. a "run in progress" marker."""
    # Without fsync a power loss after the rename can leave an empty lineage.json.
    return write_text_atomic(Path(run_dir) / name, json.dumps(lineage.to_dict(), indent=2, sort_keys=False) + "\n", fsync=True)


def read_lineage(run_dir: str | os.PathLike, name: str = LINEAGE_FILE) -> Optional[Lineage]:
    """The lineage stored in `run_dir/<name>`, or None if it is missing, not valid JSON or
    lacks fields."""
    try:
        text = (Path(run_dir) / name).read_text(encoding="utf-8")
        return Lineage.from_dict(json.loads(text))
    except (OSError, ValueError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None


def _is_temp(name: str) -> bool:
    return (name.startswith(".") and name.endswith(".tmp")) or fnmatch.fnmatch(name, "*.tmp*")


def artifact_complete(model_dir: str | os.PathLike) -> tuple[bool, str]:
    """(True, "complete") when `model_dir` holds a loadable HF export: config.json, weights
    in *.safetensors (every shard, if sharded), a tokenizer file and no leftover temp
    files; otherwise (False, what is missing)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return False, f"no model directory {model_dir}"
    names = {entry.name for entry in model_dir.iterdir()}
    if "config.json" not in names:
        return False, f"no config.json in {model_dir}"
    if not any(name.endswith(".safetensors") for name in names):
        return False, f"no *.safetensors in {model_dir}"
    if _SHARD_INDEX in names:
        # A sharded export is only usable if every shard the index names is there.
        try:
            weight_map = json.loads((model_dir / _SHARD_INDEX).read_text(encoding="utf-8"))["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return False, f"unreadable {_SHARD_INDEX} in {model_dir}"
        absent = [shard for shard in shards if shard not in names]
        if absent:
            return False, f"missing shard {absent[0]} in {model_dir}"
    if not any(name in names for name in _TOKENIZER_FILES):
        return False, f"no tokenizer file ({' or '.join(_TOKENIZER_FILES)}) in {model_dir}"
    leftovers = sorted(name for name in names if _is_temp(name))
    if leftovers:
        return False, f"leftover temp file {leftovers[0]} in {model_dir}"
    return True, "complete"


def _table_change(kind: str, stored: dict[str, str], expected: dict[str, str]) -> Optional[str]:
    for name in sorted(stored.keys() | expected.keys()):
        if name not in stored:
            return f"{kind} {name} added"
        if name not in expected:
            return f"{kind} {name} removed"
        if stored[name] != expected[name]:
            return f"{kind} {name} changed"
    return None


def _code_label(code: dict) -> str:
    commit = code.get("git_commit")
    if not commit:
        return str(code.get("package", "unknown"))
    return f"{commit[:12]}{'+dirty' if code.get('git_dirty') else ''}"


def _code_note(old: dict, new: dict) -> str:
    before, now = _code_label(old), _code_label(new)
    if before == now:  # same commit, other package version (or other fields): show versions
        before, now = str(old.get("package", "unknown")), str(new.get("package", "unknown"))
    return f"written by code {before}, now {now}"


def check_up_to_date(run_dir: str | os.PathLike, expected: Lineage, model_subdir: str = "model") -> tuple[bool, str]:
    """Whether the stage in `run_dir` can be skipped: its stored lineage matches `expected`
    and its artifact is complete. Returns (ok, reason); the first difference found wins,
    checked in the order lineage file, stage, config, inputs, parents, artifact."""
    run_dir = Path(run_dir)
    stored = read_lineage(run_dir)
    if stored is None:
        exists = (run_dir / LINEAGE_FILE).exists()
        return False, f"unreadable {LINEAGE_FILE}" if exists else f"no {LINEAGE_FILE}"
    if stored.stage != expected.stage:
        return False, f"stage changed ({stored.stage} -> {expected.stage})"
    if stored.config_hash != expected.config_hash:
        return False, "config changed"
    for kind, old, new in (("input", stored.inputs, expected.inputs), ("parent", stored.parents, expected.parents)):
        change = _table_change(kind, old, new)
        if change:
            return False, change
    complete, why = artifact_complete(run_dir / model_subdir)
    if not complete:
        return False, f"artifact incomplete: {why}"
    # Code changes alone do not force a re-run (that would re-train on every commit); say so.
    if stored.code != expected.code:
        return True, f"up to date ({_code_note(stored.code, expected.code)})"
    return True, "up to date"
