"""Weights of a model built on the meta device (rlhf/models/loading.py `PendingWeights`), loaded
into its FSDP2 shards after `fully_shard`: no rank ever holds the whole model.

A local directory of safetensors files is read slice by slice: each rank reads the rows of
its own shard of every tensor (safetensors maps the file; only those pages are touched).
Anything else (a hub id that is not on disk, a GGUF file, names that need a conversion)
is loaded whole by rank 0 alone and broadcast shard by shard (torch's
`set_model_state_dict(..., broadcast_from_rank0=True)`).

A LoRA model (rlhf/models/lora.py) reads its base weights under the checkpoint's names
(`PendingWeights.checkpoint_name`); its adapters, like a new scalar head, come from
`PendingWeights.fill_missing`.

Non-persistent buffers (rotary `inv_freq`) are in no checkpoint: they are recomputed by the
model's own initialiser, as transformers does after building on the meta device. Tied
weights are one parameter under two names; whichever name the file holds fills it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.tensor import DTensor

from rlhf.models.loading import SAFETENSORS_INDEX, PendingWeights, local_safetensors


def materialize(model: torch.nn.Module, device: torch.device, rank: int) -> None:
    """Give the sharded meta `model` storage on `device` and its weights (`model.pending_weights`)."""
    pending: PendingWeights = model.__dict__.pop("pending_weights")
    model.to_empty(device=device)
    _init_non_persistent_buffers(model)
    files = _safetensors_files(pending)
    groups = _aliases(model, pending.checkpoint_name)
    with torch.no_grad():
        missing = _read_slices(groups, files) if files is not None else _broadcast_from_rank0(model, pending, rank)
        extra = pending.fill_missing(missing)
        if set(missing) - set(extra):
            raise RuntimeError(f"{pending.location}: no weights for {sorted(set(missing) - set(extra))[:5]}")
        for names, tensor in groups:
            full = extra.get(names[0])
            if full is not None:
                _copy_shard(tensor, lambda rows, full=full: full if rows is None else full[rows])


def _init_non_persistent_buffers(model: torch.nn.Module) -> None:
    init = getattr(model, "_init_weights", None)
    for module in model.modules():
        if module._non_persistent_buffers_set:
            if init is None:
                raise RuntimeError(f"{type(module).__name__} has buffers no checkpoint holds and no initialiser")
            init(module)


def _safetensors_files(pending: PendingWeights) -> dict[str, Path] | None:
    """Tensor name -> file, for a local directory of safetensors; None otherwise."""
    if not local_safetensors(pending.location, pending.gguf_file):
        return None
    directory = Path(pending.location)
    index = directory / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return {name: directory / file for name, file in weight_map.items()}
    single = directory / "model.safetensors"
    with safe_open(single, framework="pt") as f:
        return {name: single for name in f.keys()}


def _aliases(model: torch.nn.Module, checkpoint_name) -> list[tuple[list[str], torch.Tensor]]:
    """Every parameter and persistent buffer once, with all the checkpoint names it goes by (tied
    weights). Two tensors may share a name: PEFT's trained copy of a scalar head and the head."""
    groups: dict[int, tuple[list[str], torch.Tensor]] = {}
    for name, tensor in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(tensor), ([], tensor))[0].append(checkpoint_name(name))
    state_names = set(model.state_dict().keys())
    for name, tensor in model.named_buffers(remove_duplicate=False):
        if name in state_names:
            groups.setdefault(id(tensor), ([], tensor))[0].append(checkpoint_name(name))
    return list(groups.values())


def _read_slices(groups: list[tuple[list[str], torch.Tensor]], files: dict[str, Path]) -> set[str]:
    """Fill every tensor the files hold from its rows; the names of the others. A file is
    opened (mapped) for one tensor at a time: the pages read stay in the resident set while
    it is mapped, and a rank should not hold a whole model's worth of them."""
    missing: set[str] = set()
    for names, tensor in groups:
        key = next((n for n in names if n in files), None)
        if key is None:
            missing.add(names[0])
            continue
        with safe_open(files[key], framework="pt") as handle:
            _copy_shard(tensor, lambda rows, h=handle, k=key: h.get_tensor(k) if rows is None else h.get_slice(k)[rows])
    return missing


def _copy_shard(tensor: torch.Tensor, read) -> None:
    """Copy into `tensor` (a DTensor shard or a whole tensor) its rows of the full value that
    `read(row slice)` returns (`read(None)`: all of it): FSDP2 shards dimension 0 into chunks
    of ceil(rows / shards)."""
    if not isinstance(tensor, DTensor):
        tensor.copy_(read(None))
        return
    local = tensor.to_local()
    start = 0
    for dim, placement in enumerate(tensor.placements):
        if placement.is_shard():
            if placement.dim != 0:
                raise RuntimeError(f"sharded load expects shards of dimension 0, not {placement}")
            shards = tensor.device_mesh.size(dim)
            start = tensor.device_mesh.get_local_rank(dim) * -(-tensor.shape[0] // shards)
    if local.numel() == 0:
        return
    local.copy_(read(slice(start, start + local.shape[0])).to(local.dtype))


def _broadcast_from_rank0(model: torch.nn.Module, pending: PendingWeights, rank: int) -> set[str]:
    """Rank 0 loads the model whole, every rank receives its shards; the names none of it held."""
    state = pending.load_whole().state_dict() if rank == 0 else {}
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    set_model_state_dict(model, state, options=options)
    return set()  # the whole model has every weight, a new head initialised
