"""Loading a checkpoint written by another number of workers (elastic resume).

A preempted job may come back on another allocation. What each engine needs to resume from
state saved with N workers on M:
- FSDP2 saves torch.distributed.checkpoint (DCP) shards with the global shape of every
  tensor; DCP reads any saved sharding into any current one, so the same load serves N -> M.
  The single process reads the same files into whole tensors (`load_dcp`), and FSDP2 reads a
  single-process checkpoint (safetensors weights, an index-keyed optimizer) by broadcasting
  rank 0's full state into the shards (`load_full_into_sharded`).
- DeepSpeed ZeRO 1-3 partitions the flat optimizer state by rank and refuses another data-
  parallel size. Its universal checkpoint (one fp32 file per parameter and moment) loads into
  any size: `ensure_universal` converts once, on rank 0, into a temporary directory renamed into
  place (kept beside the original, so a second resume converts nothing), while the others wait.

Every function here is called on every rank (they synchronise through the World).
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from rlhf.distributed.strategy import World

UNIVERSAL = "universal"
"""The converted copy beside a DeepSpeed checkpoint: `<role dir>/universal/<tag>/`."""


# -- DCP (FSDP2 and the single process) -------------------------------------------------------
def load_dcp(module: torch.nn.Module, optimizer: Any, dcp_dir: Path, alone: bool = False) -> None:
    """Model and optimizer from a DCP checkpoint of any sharding, into `module`'s own layout
    (DTensor shards under FSDP2, whole tensors in a single process: `alone`, no process group)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    # get_state_dict creates the optimizer's state of a fresh run (torch takes a step at
    # learning rate 0): the moments and step counts need tensors to be read into.
    model_state, optim_state = get_state_dict(module, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    with warnings.catch_warnings():
        # DCP warns on every load without a process group, which `alone` asks for.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(dcp_dir), no_dist=alone)
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def save_dcp(module: torch.nn.Module, optimizer: Any, dcp_dir: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(module, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(dcp_dir))


def full_optimizer_state(module: torch.nn.Module, optimizer: Any, saved: dict) -> dict:
    """A plain `optimizer.state_dict()` (parameters numbered in param-group order) as the
    full state dict that torch.distributed's `set_state_dict` takes, keyed by parameter name.
    `optimizer` is the current one, built over the same groups in the same order (both
    strategies build it with `build_optimizer`), which gives number -> name."""
    names = {}
    for name, param in module.named_parameters():
        names.setdefault(id(param), name)
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    if len(saved["param_groups"]) != len(optimizer.param_groups) or \
            sum(len(g["params"]) for g in saved["param_groups"]) != len(order):
        raise RuntimeError("the saved optimizer's parameter groups do not match this model's")
    groups = []
    for group in saved["param_groups"]:
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": [order[i] for i in group["params"]]})
    return {"state": {order[i]: value for i, value in saved["state"].items()}, "param_groups": groups}


def load_full_into_sharded(module: torch.nn.Module, optimizer: Any, weights: dict[str, torch.Tensor] | None,
                           optim: dict | None) -> None:
    """Rank 0's full weights and full (name-keyed) optimizer state into every rank's shards:
    only rank 0 holds them (the others pass None), `set_state_dict` broadcasts each tensor and
    every rank keeps its piece, so no rank ever holds a second whole model."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    if weights is not None:
        # A tied weight is saved once (safetensors keeps one name per storage): its aliases
        # take the same tensor.
        aliases: dict[int, list[str]] = {}
        for name, param in module.named_parameters(remove_duplicate=False):
            aliases.setdefault(id(param), []).append(name)
        for names in aliases.values():
            present = [n for n in names if n in weights]
            for name in names:
                if present and name not in weights:
                    weights[name] = weights[present[0]]
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    # Apart, not through set_state_dict: that one skips the model on a rank whose dict is empty
    # (every rank but 0 here) while rank 0 broadcasts it.
    set_model_state_dict(module, weights or {}, options=options)
    set_optimizer_state_dict(module, optimizer, optim or {}, options=options)


# -- DeepSpeed universal checkpoints ----------------------------------------------------------
def zero_saved_world_size(engine_dir: Path) -> int | None:
    """The data-parallel size a ZeRO 1-3 checkpoint was saved with (one optimizer shard per
    rank); None for stage 0, whose optimizer state is whole."""
    shards = list(engine_dir.glob("*zero_pp_rank_*_optim_states.pt"))
    return len(shards) or None


def ensure_universal(world: World, role_dir: Path, tag: str, saved: int) -> Path:
    """`role_dir/universal` holding DeepSpeed's universal form of `role_dir/<tag>` (saved by
    `saved` ranks), made on rank 0 unless already there; every rank gets the directory, or
    the conversion's error."""
    target = role_dir / UNIVERSAL
    error: Exception | None = None
    if world.is_main and not (target / tag).is_dir():
        started = time.time()
        tmp = role_dir / f".{UNIVERSAL}.tmp-{os.getpid()}"
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            _convert(role_dir / tag, tmp / tag)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
            print(f"[checkpoint] {role_dir.parent.name}/{role_dir.name}: saved by {saved} ZeRO worker(s), this run "
                  f"has {world.world_size}: converted to DeepSpeed's universal checkpoint in {target} "
                  f"({time.time() - started:.1f} s)", flush=True)
        except Exception as exc:  # noqa: BLE001 - every rank raises below, none waits forever
            shutil.rmtree(tmp, ignore_errors=True)
            error = exc
    agree(world, error, f"converting {role_dir / tag} to a universal checkpoint")
    return target


def agree(world: World, error: Exception | None, what: str) -> None:
    """Raise on every rank if `what` failed on any (its own error where it failed), so that
    no rank goes on into a collective that the failed one never joins."""
    if world.all_reduce({"failed": float(error is not None)}, op="max")["failed"]:
        if error is not None:
            raise error
        raise RuntimeError(f"{what} failed on another worker (see its error)")


def _convert(source: Path, output: Path) -> None:
    from contextlib import redirect_stderr, redirect_stdout
    from io import StringIO

    from deepspeed.checkpoint import ds_to_universal

    # In-process and serial: worker pools would fork a process holding the process group.
    args = argparse.Namespace(input_folder=str(source), output_folder=str(output), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)
    with redirect_stdout(StringIO()), redirect_stderr(StringIO()):  # its banners and progress bars
        ds_to_universal.main(args)


def load_universal(engine: Any, universal_dir: Path, tag: str) -> None:
    """Load DeepSpeed's universal checkpoint into `engine` at its own world size: weights,
    Adam moments and step, schedule and step counters. DeepSpeed reads the choice from its
    config at load time; it is switched on for this load only (the next save is a regular one)."""
    config = engine._config
    groups = engine.optimizer.optimizer.param_groups if engine.zero_optimization_stage() == 3 else []
    # Two slips of DeepSpeed 0.19.8's ZeRO-3 universal load are undone below: it gives every
    # parameter group the hyperparameters of the first (the no-decay group would get weight
    # decay; each group's own come from the config, the learning rate from the schedule), and
    # one `step` tensor to all of them, which the fused AdamW then advances once per group.
    fixed = [{k: v for k, v in group.items() if k not in ("params", "lr")} for group in groups]
    config.load_universal_checkpoint = True
    try:
        path, _ = engine.load_checkpoint(str(universal_dir), tag=tag, load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
    finally:
        config.load_universal_checkpoint = False
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the universal checkpoint in {universal_dir}")
    for group, own in zip(groups, fixed):
        group.update(own)
    if groups:
        for state in engine.optimizer.optimizer.state.values():  # keyed by the flat fp32 partitions
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()
