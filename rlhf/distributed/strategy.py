"""The one interface every stage trains through. Implementations: single.py (one process),
deepspeed.py (ZeRO 0-3, CPU offload) and fsdp.py (FSDP2), so a stage never branches on the
engine and never imports one. `DistributedStrategy` below holds what the multi-process
engines share: launch detection, the process group, metric reduction, rank-0 export.

Loss contract: `backward(model, loss)` takes this micro-batch's share of the step's loss
(its token-loss sum divided by the token count of the whole global batch), so summing the
gradients of all micro-batches on all workers gives the gradient of the global mean. Each
engine undoes its own loss scaling (gradient-accumulation division, rank averaging):
single sums micro-batch gradients as they are; DeepSpeed is called with scale_wrt_gas=False
and the loss times world_size (its gradient reduction averages over ranks); FSDP2 likewise
gets the loss times world_size (its reduce-scatter averages over ranks).
"""

from __future__ import annotations

import atexit
import os
import random
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from rlhf.config_sections import StrategyConfig
from rlhf.distributed import env
from rlhf.distributed.host_memory import tune_host_memory
from rlhf.errors import ConfigError, UserError
from rlhf.training.optim import OptimizerSpec


@dataclass
class TrainedModel:
    """A model with its optimizer and schedule, as returned by `Strategy.wrap`."""

    module: torch.nn.Module
    """What to call forward on (an engine wrapper where the strategy has one)."""
    optimizer: Any
    scheduler: Any
    max_grad_norm: float = 0.0
    """Clip the global gradient norm to this in `step`; 0 disables clipping."""
    accumulation: int = 1
    """`backward` calls per optimizer step on each worker (gradient accumulation)."""
    pending_backwards: int = 0
    """`backward` calls since the last `step`."""

    @property
    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Strategy(ABC):
    name: str = ""

    def __init__(self, cfg: StrategyConfig):
        self.cfg = cfg
        self.device = torch.device("cpu")
        self.rank = 0
        self.world_size = 1

    # -- process group ------------------------------------------------------------------
    @abstractmethod
    def setup(self, seed: int) -> None:
        """Join the process group (if any), pick the device, seed every RNG."""

    def teardown(self) -> None:
        """End of a stage: release what `setup` took (see DistributedStrategy for the group)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every worker."""

    def all_reduce(self, values: dict[str, float], op: str = "mean") -> dict[str, float]:
        """Combine scalar metrics over workers ("mean" or "sum")."""
        return dict(values)

    @contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (e.g. writes a file), the others after it."""
        if not self.is_main:
            self.barrier()
        try:
            yield
        finally:
            if self.is_main:
                self.barrier()

    def accumulation_steps(self, global_batch_size: int, micro_batch_size: int) -> int:
        """Micro-batches per worker per optimizer step; a ConfigError unless the global batch
        splits evenly into micro-batches over all workers."""
        per_pass = micro_batch_size * self.world_size
        if global_batch_size % per_pass:
            raise ConfigError(
                f"train.global_batch_size={global_batch_size} must be a multiple of train.micro_batch_size "
                f"x workers = {micro_batch_size} x {self.world_size} = {per_pass}"
            )
        return global_batch_size // per_pass

    # -- training -----------------------------------------------------------------------
    @abstractmethod
    def wrap(
        self, model: torch.nn.Module, spec: OptimizerSpec, accumulation: int = 1, micro_batch_size: int = 1
    ) -> TrainedModel:
        """Shard/place `model` and build its optimizer and schedule. `accumulation` is the
        number of `backward` calls before each `step` (sharded engines rely on it);
        `micro_batch_size` is informational (DeepSpeed's batch-size bookkeeping)."""

    @abstractmethod
    def backward(self, model: TrainedModel, loss: torch.Tensor) -> None: ...

    @abstractmethod
    def step(self, model: TrainedModel) -> float:
        """Clip gradients, step optimizer and schedule, zero gradients; returns the global
        gradient norm before clipping."""

    # -- state --------------------------------------------------------------------------
    @abstractmethod
    def save_state(self, model: TrainedModel, directory: Path) -> None:
        """Write model and optimizer (shards) and the schedule into `directory`."""

    @abstractmethod
    def load_state(self, model: TrainedModel, directory: Path) -> None: ...

    @abstractmethod
    def export(
        self, model: TrainedModel, tokenizer: PreTrainedTokenizerBase, directory: Path, extra_files: dict | None = None
    ) -> None:
        """Gather the full weights and write a `save_pretrained` directory (rank 0), with
        `extra_files` (name -> JSON payload) beside it."""

    def unwrap(self, model: TrainedModel) -> torch.nn.Module:
        return model.module


class DistributedStrategy(Strategy):
    """What the multi-process engines share. A world of one (no launcher) still gets a
    process group, so a sharded engine also runs as one plain process.

    The process group lives as long as the process: the first `setup` creates it, later ones
    (the next stage of a pipeline run in the same process) reuse it, and it is destroyed at
    exit. DeepSpeed caches its groups on first use, so a destroyed and re-created group would
    break a second DeepSpeed stage in the same process."""

    backend: str = "gloo"
    local_rank: int = 0

    def setup(self, seed: int) -> None:
        launch = env.detect_launch()
        env.export_single_process_env(launch)
        self.rank, self.world_size, self.local_rank = launch.rank, launch.world_size, launch.local_rank
        self.device, self.backend = env.pick_device(launch.local_rank)
        if self.device.type == "cpu":
            env.configure_cpu_threads(launch)
            tune_host_memory()
        if not torch.distributed.is_initialized():
            kwargs = {"device_id": self.device} if self.backend == "nccl" else {}
            torch.distributed.init_process_group(self.backend, init_method="env://", rank=self.rank,
                                                 world_size=self.world_size, **kwargs)
            atexit.register(_destroy_process_group)
        seed_everything(seed)

    def teardown(self) -> None:
        """Wait for every worker; the process group itself is destroyed at exit."""
        if torch.distributed.is_initialized():
            self.barrier()

    def barrier(self) -> None:
        if self.backend == "nccl":
            torch.distributed.barrier(device_ids=[self.device.index])
        else:
            torch.distributed.barrier()

    def all_reduce(self, values: dict[str, float], op: str = "mean") -> dict[str, float]:
        if op not in ("mean", "sum"):
            raise ValueError(f"all_reduce op must be mean or sum, not {op!r}")
        keys = sorted(values)
        # float64: token counts stay exact and sums of losses lose nothing.
        tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        if op == "mean":
            tensor /= self.world_size
        return dict(zip(keys, tensor.tolist()))

    # -- loss contract ------------------------------------------------------------------
    def _count_backward(self, model: TrainedModel) -> bool:
        """Count a backward pass; True when it is the last one before `step`."""
        if model.pending_backwards >= model.accumulation:
            raise RuntimeError(
                f"{model.pending_backwards + 1} backward passes before step, but the model was wrapped "
                f"with accumulation={model.accumulation}; pass the real count to Strategy.wrap"
            )
        model.pending_backwards += 1
        return model.pending_backwards == model.accumulation

    def _check_step(self, model: TrainedModel) -> None:
        if model.pending_backwards != model.accumulation:
            raise RuntimeError(
                f"step after {model.pending_backwards} backward passes, but the model was wrapped with "
                f"accumulation={model.accumulation}"
            )
        model.pending_backwards = 0

    # -- export -------------------------------------------------------------------------
    @abstractmethod
    def full_state_dict(self, model: TrainedModel) -> dict[str, torch.Tensor]:
        """Every worker calls this; rank 0 gets the complete weights on CPU, the others {}."""

    def export(self, model: TrainedModel, tokenizer: PreTrainedTokenizerBase, directory: Path,
               extra_files: dict | None = None) -> None:
        state = self.full_state_dict(model)
        if self.is_main:
            from rlhf.distributed.gather import export_gathered

            export_gathered(self.unwrap(model), state, tokenizer, directory, extra_files)
        self.barrier()


def _destroy_process_group() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def build_strategy(cfg: StrategyConfig) -> Strategy:
    if cfg.name == "single":
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if world > 1:
            raise UserError(
                f"strategy.name=single runs one process, but this launch has WORLD_SIZE={world}; "
                "use strategy.name=deepspeed or strategy.name=fsdp"
            )
        from rlhf.distributed.single import SingleStrategy

        return SingleStrategy(cfg)
    if cfg.name == "deepspeed":
        from rlhf.distributed.deepspeed import DeepSpeedStrategy

        return DeepSpeedStrategy(cfg)
    if cfg.name == "fsdp":
        from rlhf.distributed.fsdp import FSDPStrategy

        return FSDPStrategy(cfg)
    raise UserError(f"strategy.name={cfg.name!r} is not one of: single, deepspeed, fsdp")
