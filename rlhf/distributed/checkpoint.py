"""Atomic, resumable checkpoints: `<root>/step-<N>/` directories plus a `latest` pointer.

A save goes to `<root>/.step-<N>.tmp/`, is renamed into place when every worker has written
its part, and only then is `latest` rewritten (itself by rename). A crash at any moment
leaves the previous checkpoint complete and `latest` pointing at it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlhf.distributed.strategy import Strategy, TrainedModel
from rlhf.errors import UserError

META = "meta.json"


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


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


class CheckpointManager:
    def __init__(self, root: str | os.PathLike, strategy: Strategy, keep_last: int = 2):
        self.root = Path(root)
        self.strategy = strategy
        self.keep_last = max(1, keep_last)

    def latest(self) -> Path | None:
        pointer = self.root / "latest"
        if not pointer.is_file():
            return None
        path = self.root / pointer.read_text(encoding="utf-8").strip()
        return path if (path / META).is_file() else None

    def save(self, models: dict[str, TrainedModel], step: int, client_state: dict[str, Any]) -> Path:
        """Save every trained model's full state plus this worker's `client_state` (step,
        data position, algorithm state) and RNG states."""
        name = f"step-{step}"
        tmp = self.root / f".{name}.tmp"
        final = self.root / name
        if self.strategy.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.strategy.barrier()
        for role, model in models.items():
            self.strategy.save_state(model, tmp / role)
        state = dict(client_state, rng=_rng_state())
        torch.save(state, tmp / f"client_state_rank{self.strategy.rank}.pt")
        self.strategy.barrier()
        if self.strategy.is_main:
            meta = {"step": step, "strategy": self.strategy.name, "world_size": self.strategy.world_size,
                    "roles": sorted(models)}
            (tmp / META).write_text(json.dumps(meta), encoding="utf-8")
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            _write_text_atomic(self.root / "latest", name)
            self._prune()
        self.strategy.barrier()
        return final

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

    def resolve(self, resume: str) -> Path | None:
        """The checkpoint `train.resume` asks for: auto -> latest (if any), never -> none."""
        if resume == "never":
            return None
        if resume == "auto":
            return self.latest()
        path = Path(resume)
        if not (path / META).is_file():
            raise UserError(f"train.resume: {resume}: not a complete checkpoint (no {META})")
        return path

    def load(self, models: dict[str, TrainedModel], path: Path) -> dict[str, Any]:
        meta = json.loads((path / META).read_text(encoding="utf-8"))
        if meta["strategy"] != self.strategy.name or meta["world_size"] != self.strategy.world_size:
            raise UserError(
                f"checkpoint {path} was written by strategy {meta['strategy']} with {meta['world_size']} "
                f"worker(s); this run uses {self.strategy.name} with {self.strategy.world_size}. Resume with "
                f"the same strategy and world size, or start fresh with train.resume=never"
            )
        if sorted(models) != meta["roles"]:
            raise UserError(f"checkpoint {path} holds {meta['roles']}, this run trains {sorted(models)}")
        for role, model in models.items():
            self.strategy.load_state(model, path / role)
        state = torch.load(path / f"client_state_rank{self.strategy.rank}.pt", weights_only=True)
        _set_rng_state(state.pop("rng"))
        return state
