"""PyTorch FSDP2 (`fully_shard`) behind the Strategy interface.

Each transformer block (the classes a model lists in `_no_split_modules`) is its own FSDP
unit, the root module holds the rest (embeddings, final norm, tied head). Options:
- CPU offload (`strategy.offload_params` or `offload_optimizer`): FSDP2's CPUOffloadPolicy
  keeps sharded parameters, gradients and the optimizer step on CPU; it offloads all three
  together, so either flag turns it on.
- Mixed precision (MixedPrecisionPolicy), on GPUs and CPUs alike: bf16/fp16 compute and
  all-gathers, fp32 sharded parameters and fp32 gradient reduction (a low-precision model is
  upcast before sharding so that the optimizer steps fp32 weights). gloo all-gathers bf16 on
  the CPU; `auto` decides as for the other engines (rlhf/distributed/precision.py).
- Several nodes: HSDP, a (replicate, shard) device mesh of nodes x workers per node, where
  each node's share of the state fits (`mesh_shape`): parameters are all-gathered within a
  node (NVLink) and only the gradients cross nodes (one all-reduce), instead of every layer's
  all-gather and reduce-scatter spanning the slower network. Otherwise one flat mesh.
Checkpoints are sharded with torch.distributed.checkpoint (DCP), one file per rank, and load
at any number of workers, also a single-process checkpoint (reshard.py); export gathers a
full state dict on rank 0 (CPU).

Loss contract (see strategy.py): the reduce-scatter averages over ranks, so `backward` runs
on loss * world_size. Gradient accumulation without communication: the gradient sync is
switched off for every micro-batch but the last of a step.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor

from rlhf.distributed import env, reshard
from rlhf.distributed.precision import LOW_PRECISION
from rlhf.distributed.group import DistributedStrategy
from rlhf.distributed.optim import OptimizerSpec, build_optimizer, build_scheduler
from rlhf.distributed.single import SINGLE_OPTIMIZER, SINGLE_WEIGHTS
from rlhf.distributed.strategy import TrainedModel
from rlhf.errors import UserError
from rlhf.distributed.sharded_load import materialize
from rlhf.kernels.host_memory import release_fragments
from rlhf.models.loading import Placement


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks to shard one by one, found by the class names transformers lists
    in `_no_split_modules` (PEFT wrappers are looked through)."""
    names: set[str] = set()
    for module in (model, getattr(model, "get_base_model", lambda: model)()):
        names.update(getattr(module, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise UserError(
            f"FSDP: no transformer blocks found in {type(model).__name__} (it lists no _no_split_modules); "
            "use strategy.name=deepspeed for this model"
        )
    return blocks


HSDP_MEMORY_SHARE = 0.5
"""HSDP is chosen only where a rank's share of the sharded state (split over its node's
workers alone) stays under this fraction of the device's memory: the rest is for activations,
the gathered layers and the other roles' models."""

_STATE_BYTES_PER_TRAINED_PARAM = 16
"""fp32 weight, fp32 gradient and AdamW's two fp32 moments."""


def mesh_shape(world_size: int, local_world_size: int, state_bytes: int = 0,
               device_bytes: int | None = None) -> tuple[int, ...]:
    """(nodes, workers per node) for HSDP, else (world_size,). HSDP needs more than one node,
    nodes of equal size (ranks are numbered node by node, so a row of the mesh is a node) and,
    where the device's memory is known, `state_bytes` / workers per node within
    HSDP_MEMORY_SHARE of it (each node holds a whole copy of the state)."""
    if local_world_size < 1 or world_size % local_world_size or world_size // local_world_size < 2:
        return (world_size,)
    if device_bytes is not None and state_bytes / local_world_size > HSDP_MEMORY_SHARE * device_bytes:
        return (world_size,)
    return (world_size // local_world_size, local_world_size)


def sharded_state_bytes(model: torch.nn.Module) -> int:
    """Bytes of the state FSDP2 shards for `model`: fp32 weights, and for trained parameters
    their gradient and AdamW moments."""
    total = 0
    for param in model.parameters():
        total += param.numel() * (_STATE_BYTES_PER_TRAINED_PARAM if param.requires_grad else 4)
    return total


class FSDPStrategy(DistributedStrategy):
    name = "fsdp"

    def setup(self, seed: int) -> None:
        super().setup(seed)
        self.local_world_size = env.detect_launch().local_world_size
        self.meshes: dict[tuple[int, ...], DeviceMesh] = {}

    def mesh_for(self, model: torch.nn.Module) -> DeviceMesh:
        """HSDP or the flat mesh for `model` (`mesh_shape`); every rank takes the same decision
        (the memory check is agreed by all-reduce, devices may differ), and a mesh is built once."""
        offload = self.cfg.offload_params or self.cfg.offload_optimizer
        device_bytes = torch.cuda.get_device_properties(self.device).total_memory \
            if self.device.type == "cuda" and not offload else None
        shape = mesh_shape(self.world_size, self.local_world_size, sharded_state_bytes(model), device_bytes)
        if self.all_reduce({"hsdp": float(len(shape) == 2)}, op="sum")["hsdp"] < self.world_size:
            shape = (self.world_size,)
        if shape not in self.meshes:
            names = ("replicate", "shard") if len(shape) == 2 else ("shard",)
            self.meshes[shape] = init_device_mesh(self.device.type, shape, mesh_dim_names=names)
        return self.meshes[shape]

    def placement(self) -> Placement:
        """Built on the meta device, weights read into the shards after `fully_shard`."""
        return Placement("meta")

    def _shard(self, model: torch.nn.Module, trained: bool = True) -> None:
        """`fully_shard` each transformer block, then the root; a meta model (built with
        `placement()`) then gets its storage and weights, this rank's shards only. Only a
        trained model is upcast to fp32 shards (its master weights); a frozen one keeps its
        dtype."""
        mesh = self.mesh_for(model)
        low = LOW_PRECISION.get(self.precision)
        mp_policy = MixedPrecisionPolicy()
        if low is not None:
            if trained:
                model.to(torch.float32)
            mp_policy = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32)
        offload = self.cfg.offload_params or self.cfg.offload_optimizer
        policy = CPUOffloadPolicy(pin_memory=self.device.type == "cuda") if offload else OffloadPolicy()
        pending = "pending_weights" in model.__dict__
        if not pending:
            model.to(self.device)
        for block in transformer_blocks(model):
            fully_shard(block, mesh=mesh, mp_policy=mp_policy, offload_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=mp_policy, offload_policy=policy)
        if pending:
            materialize(model, self.device, self.rank)

    def wrap(
        self, model: torch.nn.Module, spec: OptimizerSpec, accumulation: int = 1, micro_batch_size: int = 1
    ) -> TrainedModel:
        self._shard(model)
        optimizer = build_optimizer(model, spec)
        return TrainedModel(model, optimizer, build_scheduler(optimizer, spec), spec.max_grad_norm, accumulation,
                            strategy=self)

    def freeze(self, model: torch.nn.Module) -> torch.nn.Module:
        """Sharded like a trained model, without gradients or optimizer."""
        model.requires_grad_(False)
        self._shard(model, trained=False)
        return model

    @contextmanager
    def gathered_for_generation(self, model: torch.nn.Module) -> Iterator[bool]:
        """Every FSDP2 unit of `model` unsharded once (an all-gather per unit) and left so by
        the forwards of the block; then resharded, each with the reshard-after-forward setting
        `_shard` gave it: the blocks free their weights after their forward, the root (FSDP2's
        default for it) keeps its own (embeddings, final norm, head) for the head and the
        backward."""
        units = [module for module in model.modules() if isinstance(module, FSDPModule)]
        if not units:
            yield False
            return
        for unit in units:
            unit.set_reshard_after_forward(False, recurse=False)
        try:
            for unit in units:
                unit.unshard()
            yield True
        finally:
            for unit in units:
                unit.reshard()
                unit.set_reshard_after_forward(unit is not model, recurse=False)

    def backward(self, model: TrainedModel, loss: torch.Tensor) -> None:
        last = self._count_backward(model)
        module = model.module
        if model.accumulation > 1 and isinstance(module, FSDPModule):
            module.set_requires_gradient_sync(last)
        (loss * self.world_size).backward()

    def step(self, model: TrainedModel) -> float:
        self._check_step(model)
        params = [p for p in model.module.parameters() if p.requires_grad]
        max_norm = model.max_grad_norm if model.max_grad_norm > 0 else float("inf")
        # Gradients are DTensor shards: the norm is reduced over ranks, clipping is global.
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        if torch.isfinite(norm):  # a NaN/inf gradient is dropped, never applied (same on every rank)
            model.optimizer.step()
        model.scheduler.step()
        model.optimizer.zero_grad(set_to_none=True)
        release_fragments()
        return float(norm)

    # -- state --------------------------------------------------------------------------
    def save_state(self, model: TrainedModel, directory: Path) -> None:
        reshard.save_dcp(model.module, model.optimizer, directory / "dcp")
        if self.is_main:
            torch.save(model.scheduler.state_dict(), directory / "scheduler.pt")

    def load_state(self, model: TrainedModel, directory: Path) -> None:
        """A DCP checkpoint of any number of workers, or a single-process one (reshard.py)."""
        if (directory / "dcp").is_dir() or not (directory / SINGLE_WEIGHTS).is_file():
            reshard.load_dcp(model.module, model.optimizer, directory / "dcp")
            model.scheduler.load_state_dict(torch.load(directory / "scheduler.pt", weights_only=True))
            return
        weights = optim = error = None
        try:
            # Memory-mapped: the other ranks read only the schedule from it.
            saved = torch.load(directory / SINGLE_OPTIMIZER, weights_only=True, mmap=True)
            if self.is_main:
                weights = load_file(directory / SINGLE_WEIGHTS)
                optim = reshard.full_optimizer_state(model.module, model.optimizer, saved["optimizer"])
        except Exception as exc:  # noqa: BLE001 - raised on every rank below, before any broadcast
            error = exc
        reshard.agree(self, error, f"reading {directory}")
        reshard.load_full_into_sharded(model.module, model.optimizer, weights, optim)
        model.scheduler.load_state_dict(saved["scheduler"])

    def full_state_dict(self, model: TrainedModel) -> dict[str, torch.Tensor]:
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(model.module, options=options)
        return state if self.is_main else {}
