"""Exponential moving average of a model's trainable weights, as full fp32 tensors on CPU.

Sharded engines hold a piece of each parameter per rank: a ZeRO-3 parameter is an empty
placeholder (numel 0) outside `GatheredParameters`, an FSDP2 parameter a DTensor shard. An
average of those would be of nothing (ZeRO-3) or of one rank's shard, tied to this run's
world size (FSDP2). So every update gathers the full parameters one at a time (peak: one
extra full tensor) and rank 0 keeps the average; the other ranks take part in the gathers and
hold nothing, so the host memory is one fp32 copy per run, not per rank, and a checkpoint's
EMA (rank 0's client state) does not depend on the number of workers. `copy_to` writes rank
0's average back into every rank's piece. Every rank calls every method (they gather).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch.distributed.tensor import DTensor, distribute_tensor


def _is_zero3(param: torch.nn.Parameter) -> bool:
    """A parameter partitioned by DeepSpeed ZeRO-3 (it carries `ds_id`)."""
    return hasattr(param, "ds_id")


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


@contextmanager
def _zero3_gathered(param: torch.nn.Parameter, modifier_rank: int | None) -> Iterator[None]:
    """The full ZeRO-3 parameter inside the block; with `modifier_rank`, that rank's writes are
    broadcast and partitioned again on exit."""
    import deepspeed  # only reached with ZeRO-3 parameters, i.e. DeepSpeed already imported

    with deepspeed.zero.GatheredParameters([param], modifier_rank=modifier_rank):
        yield


def full_parameters(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full detached tensor) of each trainable parameter, gathered one at a time; a
    ZeRO-3 tensor is valid only until the next item is asked for. A collective for sharded
    models: every rank iterates over all of it."""
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if _is_zero3(param):
            with _zero3_gathered(param, modifier_rank=None):
                yield name, param.detach()
        elif isinstance(param, DTensor):
            yield name, _full_dtensor(param.detach())
        else:
            yield name, param.detach()


def _mesh_device(mesh) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if mesh.device_type == "cuda" else \
        torch.device(mesh.device_type)


def _full_dtensor(param: DTensor) -> torch.Tensor:
    """The whole tensor, gathered on the mesh's device: FSDP2's CPU offload keeps the shards
    in host memory, which NCCL cannot gather."""
    mesh = param.device_mesh
    local = param.to_local()
    if local.device.type != mesh.device_type:
        param = DTensor.from_local(local.to(_mesh_device(mesh)), mesh, param.placements, run_check=False,
                                   shape=param.shape, stride=param.stride())
    return param.full_tensor()


class EMA:
    """shadow = decay * shadow + (1 - decay) * weights after each update (Polyak averaging)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.keeps = _rank() == 0
        """Only rank 0 holds the average (see the module docstring)."""
        self.shadow: dict[str, torch.Tensor] = {}
        for name, full in full_parameters(model):
            if self.keeps:
                self.shadow[name] = full.to("cpu", torch.float32, copy=True)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for name, full in full_parameters(model):
            if self.keeps and name in self.shadow:
                self.shadow[name].mul_(self.decay).add_(full.to("cpu", torch.float32), alpha=1 - self.decay)

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        """Rank 0's average into the model's weights on every rank (e.g. before an export)."""
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            if _is_zero3(param):
                # Rank 0 writes the full tensor; DeepSpeed broadcasts it and re-partitions.
                with _zero3_gathered(param, modifier_rank=0):
                    if self.keeps:
                        param.data.copy_(self.shadow[name].to(param.device, param.dtype))
            elif isinstance(param, DTensor):
                mesh = param.device_mesh
                full = self._on_every_rank(name, param.shape).to(_mesh_device(mesh), param.dtype)
                # Every rank holds the same full tensor: each cuts its own piece, no communication.
                param.copy_(distribute_tensor(full, mesh, param.placements, src_data_rank=None))
            else:
                param.copy_(self._on_every_rank(name, param.shape).to(param.device, param.dtype))

    def _on_every_rank(self, name: str, shape: torch.Size) -> torch.Tensor:
        """Rank 0's full average on every rank, broadcast over the default group on its
        collective device (CUDA under NCCL, also for a parameter offloaded to CPU)."""
        if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
            return self.shadow[name]
        device = torch.device("cuda", torch.cuda.current_device()) \
            if "nccl" in str(torch.distributed.get_backend()) else torch.device("cpu")
        full = self.shadow[name].to(device) if self.keeps else torch.empty(shape, dtype=torch.float32, device=device)
        torch.distributed.broadcast(full, src=0)
        return full

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.shadow = {k: v.clone() for k, v in state.items()} if self.keeps else {}

