"""The one interface every stage trains through, and the `World` it extends. Implementations:
single.py (one process), deepspeed.py (ZeRO 0-3, CPU offload) and fsdp.py (FSDP2), with what
the multi-process engines share in group.py; factory.py builds one from the config. A stage
never branches on the engine and never imports one.

`World` is where a process sits among a run's workers (rank, size, collectives on scalar
metrics); a `Strategy` adds the training engine. The Ray driver of PPO role groups is a world
of one that trains nothing itself.

Loss contract: `backward(model, loss)` takes this micro-batch's share of the step's loss
(its token-loss sum divided by the token count of the whole global batch), so summing the
gradients of all micro-batches on all workers gives the gradient of the global mean. Each
engine undoes its own loss scaling (gradient-accumulation division, rank averaging):
single sums micro-batch gradients as they are; DeepSpeed is called with scale_wrt_gas=False
and the loss times world_size (its gradient reduction averages over ranks); FSDP2 likewise
gets the loss times world_size (its reduce-scatter averages over ranks).
"""

from __future__ import annotations

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
from rlhf.distributed.optim import OptimizerSpec
from rlhf.distributed.precision import ProbeShape
from rlhf.errors import ConfigError
from rlhf.models.loading import WHOLE, Placement


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
    strategy: "Strategy | None" = None
    """The strategy that wrapped it: saves, loads and exports it."""

    @property
    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def save_state(self, directory: Path) -> None:
        """Model and optimizer (shards) and the schedule, into `directory`."""
        self.strategy.save_state(self, directory)

    def load_state(self, directory: Path) -> None:
        self.strategy.load_state(self, directory)

    def export(self, directory: Path, tokenizer: PreTrainedTokenizerBase, extra_files: dict | None = None) -> None:
        """Full weights as a `save_pretrained` directory (see `Strategy.export`)."""
        self.strategy.export(self, tokenizer, directory, extra_files)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


class World:
    """One process alone: rank 0 of a world of one. Subclasses join a process group."""

    name: str = "single"
    """Recorded in checkpoints: a run resumes only under the same layout."""

    def __init__(self) -> None:
        self.device = torch.device("cpu")
        self.rank = 0
        self.world_size = 1

    def setup(self, seed: int) -> None:
        """Join the process group (if any), pick the device, seed every RNG."""
        self.device = pick_device()
        seed_everything(seed)

    def teardown(self) -> None:
        """End of a stage: release what `setup` took."""

    def placement(self) -> Placement:
        """How models this world trains or scores are to be built (rlhf/models/loading.py):
        whole here; sharded engines build them partitioned or on the meta device."""
        return WHOLE

    def freeze(self, model: torch.nn.Module) -> torch.nn.Module:
        """A model that is only scored (reference, reward model), built with `placement()`,
        ready for forwards on this world's device: whole here, sharded by sharded engines
        (then its forwards are collectives: every worker must run as many)."""
        return model.to(self.device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every worker."""

    def all_reduce(self, values: dict[str, float], op: str = "mean") -> dict[str, float]:
        """Combine scalar metrics over workers ("mean", "sum" or "max")."""
        if op not in REDUCE_OPS:
            raise ValueError(f"all_reduce op must be one of {', '.join(REDUCE_OPS)}, not {op!r}")
        return {key: float(value) for key, value in values.items()}

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """`tensor` of every worker, in rank order (same shape and dtype on all of them)."""
        return [tensor]

    @contextmanager
    def gathered_for_generation(self, model: torch.nn.Module) -> Iterator[bool]:
        """Hold `model`'s whole weights on every rank for the block (a rollout), so that its
        forwards gather nothing and are no collectives; yields whether it gathered anything.
        Engines that shard weights (ZeRO-3, FSDP2) gather each weight once here, instead of in
        every forward (every decode step); the cost is the whole model's weights, in the compute
        dtype, on each rank for the block's duration. Every rank enters it together (the gather
        is a collective). Here, and for engines that keep whole weights: nothing to do."""
        yield False

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


REDUCE_OPS = ("mean", "sum", "max")


class Strategy(World, ABC):
    """A world that trains: wraps models for an engine and runs their steps."""

    def __init__(self, cfg: StrategyConfig, probe_shape: ProbeShape | None = None):
        super().__init__()
        self.cfg = cfg
        self.probe_shape = probe_shape
        """The model shape strategy.mixed_precision=auto times bf16 at on a CPU (precision.py)."""

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
