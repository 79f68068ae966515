"""Atomic, resumable checkpoints: `<root>/step-<N>/` directories plus a `latest` pointer.

A save goes to `<root>/.step-<N>.tmp/`, is renamed into place when every worker has written
its part, and only then is `latest` rewritten (itself by rename). A crash at any moment
leaves the previous checkpoint complete and `latest` pointing at it.

`meta.json`, written last, holds a manifest of every file of the checkpoint with its size.
Resuming (`resolve("auto")`, `load`) skips a newest checkpoint whose files do not match it,
or that fails to load, for the next older complete one, saying so in one line; a full disk
while saving is one `DiskFullError` line, with the partial save removed. Every decision is
rank 0's, handed to the other workers through `World.all_reduce`.

Elastic resume: a checkpoint saved by N workers resumes on M (`resume_problem` says which
layouts load each other): the engines reshard their own state (reshard.py). The global batch
and the micro-batch must be the ones saved (recorded in meta.json): the data order is global
(with global batch G and micro-batch m, step s trains on micro-batches [s*G/m, (s+1)*G/m) of
one seeded epoch order, whatever the number of workers), so only the accumulation steps per
worker change with M. The client state (step, algorithm state) is the same on every worker
but the EMA, which only rank 0 holds: with another world size every worker reads rank 0's.
RNG states are per worker: rank r < N restores rank r's, a rank beyond the saved ones gets a
seed drawn from rank 0's state plus r. Data order and sampling seeds do not come from these
generators (they derive from the config's seed and the step), so only what they still drive,
such as dropout masks, differs from the N-worker run.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from rlhf.distributed.strategy import World
from rlhf.errors import UserError
from rlhf.files import write_text_atomic
from rlhf.models.export import DiskFullError, disk_full_reason, release_frames

META = "meta.json"
FILES = "files"
"""meta.json's manifest: relative path -> size in bytes of every other file of the checkpoint."""
BATCH = "batch"
"""meta.json: the batch fields of the run that saved it (field -> value), equal on resume."""
ELASTIC_FAMILIES = (("single", "fsdp"), ("deepspeed",))
"""Layouts that load each other's checkpoints at any number of workers: torch state dicts
(DCP shards or one process's files), and DeepSpeed ZeRO (through its universal checkpoint)."""
_NONE = -1.0
_DAMAGED = -2.0
_OTHERS = float("-inf")


def _rng_state() -> dict:
    # Plain lists and tensors only, so the file loads with torch.load(weights_only=True).
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _rng_for_new_rank(saved: dict, rank: int) -> None:
    """Seed every generator of a rank the checkpoint has no state for: distinct per rank,
    reproducible from the checkpoint (rank 0's torch state)."""
    generator = torch.Generator()
    generator.set_state(saved["torch"])
    seed = int(torch.randint(0, 2**62, (1,), generator=generator)) + rank
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _family(layout: str) -> tuple[str, ...] | None:
    return next((family for family in ELASTIC_FAMILIES if layout in family), None)


def resume_problem(saved_layout: str, saved_workers: int, layout: str, workers: int) -> str | None:
    """Why a checkpoint of `saved_layout` over `saved_workers` cannot resume under `layout` over
    `workers`, or None. Layouts of one family (ELASTIC_FAMILIES) resume at any number of
    workers; any other layout (Ray role groups) only as saved."""
    if saved_layout == layout and saved_workers == workers:
        return None
    family = _family(saved_layout)
    if family is not None and layout in family:
        return None
    now = f"this run uses {layout} with {workers}"
    if family is None:
        return (f"was written by {saved_layout} with {saved_workers} worker(s); {now}: this layout resumes only "
                f"as saved. Resume with the same strategy and workers, or start fresh with train.resume=never")
    choices = " or ".join(f"strategy.name={name}" for name in family)
    return (f"was written by {saved_layout} with {saved_workers} worker(s); {now}: a {saved_layout} checkpoint "
            f"resumes under {choices} (with any number of workers). Resume with that, or start fresh with "
            f"train.resume=never")


def batch_problem(saved: dict[str, int], batch: dict[str, int]) -> str | None:
    """Why a run with the batch fields `batch` cannot continue one saved with `saved`, or None."""
    changed = [key for key in sorted(saved) if key in batch and batch[key] != saved[key]]
    if not changed:
        return None
    was = ", ".join(f"{key}={saved[key]}" for key in changed)
    now = ", ".join(f"{key}={batch[key]}" for key in changed)
    return (f"was trained with {was}; this run sets {now}. Keep them to resume (the number of workers may change: "
            f"the accumulation steps are re-derived so that the global batch is the same), or start fresh with "
            f"train.resume=never")


def _step_of(name: str) -> int | None:
    prefix, _, number = name.partition("-")
    return int(number) if prefix == "step" and number.isdigit() else None


def manifest(directory: Path) -> dict[str, int]:
    """Every file under `directory` but its meta.json: relative path -> size in bytes."""
    return {
        p.relative_to(directory).as_posix(): p.stat().st_size
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.relative_to(directory).as_posix() != META
    }


def damage(path: Path) -> str | None:
    """What makes checkpoint `path` incomplete ("FILE: what"), or None when every file of its
    manifest is there with its recorded size. A checkpoint of older code, without a
    manifest, is complete when its meta.json is there."""
    if not path.is_dir():
        return "the directory is missing"
    try:
        meta = json.loads((path / META).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"{META}: missing"
    except (OSError, ValueError) as exc:
        return f"{META}: unreadable ({_one_line(exc)})"
    files = meta.get(FILES) if isinstance(meta, dict) else None
    if not isinstance(meta, dict) or not {"step", "strategy", "world_size", "roles"} <= meta.keys():
        return f"{META}: not a checkpoint's meta.json"
    for rel, size in (files or {}).items():
        try:
            actual = (path / rel).stat().st_size
        except FileNotFoundError:
            return f"{rel}: missing"
        except OSError as exc:
            return f"{rel}: {exc.strerror or exc}"
        if actual != size:
            return f"{rel}: {actual} bytes, {size} expected"
    return None


def _one_line(exc: BaseException, limit: int = 240) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _probe(path: Path) -> str | None:
    """Read one checkpoint file as its format asks; the error if it does not read. Formats
    it cannot check (or pickles that weights_only refuses by design) pass."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    f.get_tensor(key)
        elif path.suffix in (".pt", ".pth", ".bin"):
            torch.load(path, map_location="cpu", weights_only=True)
        elif path.suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
    except Exception as exc:  # noqa: BLE001 - any failure to read is the finding
        if "weights only load failed" in str(exc).lower():
            return None
        return f"{type(exc).__name__}: {_one_line(exc)}"
    return None


class _PartFailed(Exception):
    """Loading one part of a checkpoint (a role's directory, a client-state file) failed."""

    def __init__(self, part: str, error: BaseException):
        super().__init__(part)
        self.part = part
        self.error = error


class Checkpointable(Protocol):
    """What a checkpoint holds of a trained role: a `TrainedModel`, or a Ray role group that
    saves its workers' shards."""

    def save_state(self, directory: Path) -> None: ...

    def load_state(self, directory: Path) -> None: ...


class CheckpointManager:
    def __init__(self, root: str | os.PathLike, world: World, keep_last: int = 2, layout: str | None = None,
                 batch: dict[str, int] | None = None):
        """`layout` names how the trained models are laid out over processes (default: the
        world's strategy name); a checkpoint resumes under a layout `resume_problem` allows.
        `batch`: the batch fields a resumed run must keep (field -> value)."""
        self.root = Path(root)
        self.batch = dict(batch or {})
        self.world = world
        self.keep_last = max(1, keep_last)
        self.layout = layout or world.name
        self.loaded: Path | None = None
        """The checkpoint the last `load` restored (an older one than asked when it fell back)."""
        self._auto: Path | None = None

    # -- where ----------------------------------------------------------------------------
    def latest(self) -> Path | None:
        pointer = self.root / "latest"
        if not pointer.is_file():
            return None
        path = self.root / pointer.read_text(encoding="utf-8").strip()
        return path if (path / META).is_file() else None

    def _candidates(self) -> list[Path]:
        """The checkpoints `auto` may resume from, newest first: the one `latest` names and
        the older ones. None without a `latest` pointer (nothing was ever saved); all of them
        if the pointer is unreadable."""
        pointer = self.root / "latest"
        if not pointer.is_file():
            return []
        try:
            name = pointer.read_text(encoding="utf-8").strip()
        except (OSError, ValueError):
            name = ""
        newest = _step_of(name)
        steps = sorted(
            ((step, p) for p in self.root.glob("step-*") if (step := _step_of(p.name)) is not None and p.is_dir()),
            reverse=True,
        )
        if newest is None:
            return [p for _, p in steps]
        found = [p for step, p in steps if step <= newest]
        if self.root / name not in found:
            found.insert(0, self.root / name)  # reported as damaged: its directory is gone
        return found

    def _first_complete(self, candidates: list[Path]) -> tuple[Path | None, list[tuple[Path, str]]]:
        damaged = []
        for path in candidates:
            problem = damage(path)
            if problem is None:
                return path, damaged
            damaged.append((path, problem))
        return None, damaged

    def _agree(self, value: float) -> float:
        """Rank 0's `value` on every worker."""
        mine = value if self.world.is_main else _OTHERS
        return self.world.all_reduce({"value": mine}, op="max")["value"]

    def _say_skipped(self, damaged: list[tuple[Path, str]], chosen: Path, verb: str = "is damaged") -> None:
        if self.world.is_main:
            for path, problem in damaged:
                print(f"[checkpoint] {path.name} {verb} ({problem}); resuming from {chosen.name}", flush=True)

    def _none_left(self, damaged: list[tuple[Path, str]]) -> UserError:
        if not damaged:  # another worker's view: rank 0 printed the details
            return UserError(f"no complete checkpoint is left under {self.root} (see rank 0's message); "
                             "start fresh with train.resume=never")
        (first, problem), rest = damaged[0], damaged[1:]
        older = f", and so is every older one ({', '.join(p.name for p, _ in rest)})" if rest else ""
        return UserError(
            f"checkpoint {first} is damaged ({problem}){older}; no complete checkpoint is left under "
            f"{self.root}: start fresh with train.resume=never"
        )

    def resolve(self, resume: str) -> Path | None:
        """The checkpoint `train.resume` asks for: auto -> the newest complete one (if any),
        skipping damaged ones with a line each, never -> none, or an explicit path that must
        be complete. Every worker gets rank 0's answer."""
        self._auto = None
        if resume == "never":
            return None
        if resume == "auto":
            damaged: list[tuple[Path, str]] = []
            chosen: Path | None = None
            if self.world.is_main:
                chosen, damaged = self._first_complete(self._candidates())
            code = _NONE if chosen is None else float(_step_of(chosen.name))
            if damaged and chosen is None:
                code = _DAMAGED
            code = self._agree(code)
            if code == _DAMAGED:
                raise self._none_left(damaged)
            if code == _NONE:
                return None
            chosen = self.root / f"step-{int(code)}"
            self._say_skipped(damaged, chosen)
            self._auto = chosen
            return chosen
        path = Path(resume)
        problem = None
        if self.world.is_main:
            problem = damage(path)
        if self._agree(1.0 if problem else 0.0) > 0:
            if problem == "the directory is missing":
                raise UserError(f"train.resume: {resume}: no such checkpoint directory")
            if problem == f"{META}: missing":
                raise UserError(f"train.resume: {resume}: not a complete checkpoint (no {META})")
            raise UserError(f"train.resume: {resume} is damaged ({problem or 'see rank 0'}); point train.resume "
                            "at another checkpoint, or start fresh with train.resume=never")
        return path

    # -- save -----------------------------------------------------------------------------
    def save(self, models: dict[str, Checkpointable], step: int, client_state: dict[str, Any]) -> Path:
        """Save every trained model's full state plus this worker's `client_state` (step,
        data position, algorithm state) and RNG states. A full disk raises `DiskFullError` on
        every worker, with the partial save removed and `latest` untouched."""
        name = f"step-{step}"
        tmp = self.root / f".{name}.tmp"
        final = self.root / name
        error: Exception | None = None
        where = tmp
        try:
            if self.world.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
        except Exception as exc:  # noqa: BLE001 - told to every worker below
            error = exc
        self._check_save(error, where, tmp, step)  # also the barrier before the workers write
        try:
            for role, model in models.items():
                where = tmp / role
                model.save_state(tmp / role)
            where = tmp / f"client_state_rank{self.world.rank}.pt"
            state = dict(client_state, rng=_rng_state())
            torch.save(state, where)
        except Exception as exc:  # noqa: BLE001
            error = exc
        self._check_save(error, where, tmp, step)  # every worker has written its part
        renamed = False
        if self.world.is_main:
            try:
                where = tmp / META
                meta = {"step": step, "strategy": self.layout, "world_size": self.world.world_size,
                        "roles": sorted(models), BATCH: self.batch, FILES: manifest(tmp)}
                (tmp / META).write_text(json.dumps(meta), encoding="utf-8")
                shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)
                renamed = True
                where = self.root / "latest"
                write_text_atomic(self.root / "latest", name)
            except Exception as exc:  # noqa: BLE001
                error = exc
        # Renamed but `latest` not moved: the new directory goes too, unless `latest` already
        # named it (the same step saved again), which keeps it.
        partial = tmp
        if renamed:
            pointer = self.root / "latest"
            partial = tmp if pointer.is_file() and pointer.read_text(encoding="utf-8").strip() == name else final
        self._check_save(error, where, partial, step)
        if self.world.is_main:
            self._prune()
        self.world.barrier()
        return final

    def _check_save(self, error: Exception | None, where: Path, partial: Path, step: int) -> None:
        """After each phase of a save: if any worker failed, every worker stops, rank 0
        removes `partial`, and each raises (DiskFullError where a disk filled up)."""
        reason = disk_full_reason(error, where.parent) if error is not None else None
        code = 0.0 if error is None else (2.0 if reason else 1.0)
        worst = self.world.all_reduce({"failed": code}, op="max")["failed"]
        if worst == 0:
            return
        if reason is not None:
            release_frames(error)  # closes what the failed writer left open, so removing frees the space
        if self.world.is_main:
            shutil.rmtree(partial, ignore_errors=True)
        self.world.barrier()
        if error is not None and reason is None:
            raise error
        previous = self.latest()
        kept = f"the previous checkpoint {previous} is kept" if previous else "no earlier checkpoint exists"
        if reason is not None:
            target = getattr(error, "filename", None)
            target = target if isinstance(target, str) and target.startswith(str(self.root)) else where
            raise DiskFullError(
                f"{reason} while writing {target} (checkpoint step-{step}; the partial save was removed); {kept}"
            ) from error
        if worst == 2:
            raise DiskFullError(f"no space left on device on another worker while saving checkpoint step-{step} "
                                f"under {self.root} (the partial save was removed); {kept}")
        raise RuntimeError(f"another worker failed while saving checkpoint step-{step} under {self.root}; "
                           "see its error")

    def _prune(self) -> None:
        # Temp directories of saves that were killed midway: never complete, never pointed at.
        for stale in self.root.glob(".step-*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        steps = sorted(
            (int(p.name.split("-", 1)[1]), p)
            for p in self.root.glob("step-*")
            if p.is_dir() and p.name.split("-", 1)[1].isdigit()
        )
        for _, path in steps[: -self.keep_last]:
            shutil.rmtree(path, ignore_errors=True)

    # -- load -----------------------------------------------------------------------------
    def load(self, models: dict[str, Checkpointable], path: Path, fallback: bool | None = None) -> dict[str, Any]:
        """Restore `models`, the RNG states and this worker's client state from `path`. If it
        fails to load (a file corrupted in place) and `fallback` (default: `path` is what
        `resolve("auto")` chose), the next older complete checkpoint is loaded instead, with
        a line saying so; `self.loaded` tells which, and the returned state its step.
        Otherwise, or with none left, a UserError names the damaged file."""
        path = Path(path)
        if fallback is None:
            fallback = self._auto is not None and path == self._auto
        damaged: list[tuple[Path, str]] = []
        while True:
            error: _PartFailed | None = None
            try:
                state = self._load_one(models, path)
            except _PartFailed as exc:
                error = exc
            failed = self.world.all_reduce({"failed": 1.0 if error else 0.0}, op="max")["failed"] > 0
            if not failed:
                self.loaded = path
                return state
            problem = self._diagnose(path, error) if self.world.is_main else ""
            if not self.world.is_main and error is not None:
                print(f"[checkpoint] rank {self.world.rank}: {path.name}/{error.part} did not load: "
                      f"{type(error.error).__name__}: {_one_line(error.error)}", flush=True)
            if not fallback:
                raise UserError(f"checkpoint {path} is damaged ({problem or 'see rank 0'}); point train.resume at "
                                "another checkpoint, or start fresh with train.resume=never")
            damaged.append((path, problem))
            older: Path | None = None
            skipped: list[tuple[Path, str]] = []
            if self.world.is_main:
                step = _step_of(path.name)
                below = [p for p in self._candidates() if step is None or (_step_of(p.name) or 0) < step]
                older, skipped = self._first_complete(below)
            code = self._agree(_NONE if older is None else float(_step_of(older.name)))
            if code == _NONE:
                raise self._none_left(damaged + skipped if self.world.is_main else [])
            older = self.root / f"step-{int(code)}"
            self._say_skipped([(path, problem)], older, verb="could not be loaded")
            self._say_skipped(skipped, older)
            path = older

    def _load_one(self, models: dict[str, Checkpointable], path: Path) -> dict[str, Any]:
        try:
            meta = json.loads((path / META).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise _PartFailed(META, exc) from exc
        problem = resume_problem(meta["strategy"], meta["world_size"], self.layout, self.world.world_size) \
            or batch_problem(meta.get(BATCH) or {}, self.batch)
        if problem is not None:
            raise UserError(f"checkpoint {path} {problem}")
        if sorted(models) != meta["roles"]:
            raise UserError(f"checkpoint {path} holds {meta['roles']}, this run trains {sorted(models)}")
        for role, model in models.items():
            try:
                model.load_state(path / role)
            except UserError:
                raise
            except Exception as exc:  # noqa: BLE001 - a damaged file raises whatever its reader raises
                raise _PartFailed(role, exc) from exc
        saved_workers, rank = meta["world_size"], self.world.rank
        same = saved_workers == self.world.world_size
        state = self._client_state(path, rank if same else 0)
        rng = state.pop("rng")
        if same or rank == 0:
            _set_rng_state(rng)
        elif rank < saved_workers:
            _set_rng_state(self._client_state(path, rank)["rng"])
        else:
            _rng_for_new_rank(rng, rank)
        return state

    def _client_state(self, path: Path, rank: int) -> dict[str, Any]:
        client = f"client_state_rank{rank}.pt"
        try:
            return torch.load(path / client, weights_only=True)
        except Exception as exc:  # noqa: BLE001
            raise _PartFailed(client, exc) from exc

    def _diagnose(self, path: Path, error: _PartFailed | None) -> str:
        """Name the file that made `path` fail to load (rank 0, on the shared filesystem)."""
        problem = damage(path)
        if problem is not None:
            return problem
        parts = [error.part] if error is not None else []
        try:
            files = list(json.loads((path / META).read_text(encoding="utf-8")).get(FILES) or manifest(path))
        except (OSError, ValueError):
            files = list(manifest(path))
        ordered = [f for f in files if any(f == p or f.startswith(p + "/") for p in parts)]
        ordered += [f for f in files if f not in ordered]
        for rel in ordered:
            found = _probe(path / rel)
            if found is not None:
                return f"{rel}: {found}"
        if error is not None:
            return f"{error.part}: {type(error.error).__name__}: {_one_line(error.error)}"
        return "it did not load on another worker: see that worker's output"
