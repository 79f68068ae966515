"""The one interface every stage trains through. Implementations: single (this file's
neighbour single.py); DeepSpeed ZeRO and FSDP2 plug in behind the same methods, so a stage
never branches on the engine.

Loss contract: `backward(model, loss)` takes this micro-batch's share of the step's loss
(its token-loss sum divided by the token count of the whole global batch), so summing the
gradients of all micro-batches on all workers gives the gradient of the global mean. Each
engine undoes its own loss scaling (gradient-accumulation division, rank averaging).
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from rlhf.config_sections import StrategyConfig
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
        """Leave the process group."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every worker."""

    def all_reduce(self, values: dict[str, float], op: str = "mean") -> dict[str, float]:
        """Combine scalar metrics over workers ("mean" or "sum")."""
        return dict(values)

    # -- training -----------------------------------------------------------------------
    @abstractmethod
    def wrap(self, model: torch.nn.Module, spec: OptimizerSpec) -> TrainedModel:
        """Shard/place `model` and build its optimizer and schedule."""

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


def build_strategy(cfg: StrategyConfig) -> Strategy:
    if cfg.name == "single":
        from rlhf.distributed.single import SingleStrategy

        return SingleStrategy(cfg)
    from rlhf.errors import UserError

    raise UserError(f"strategy.name={cfg.name!r} is not available yet; use strategy.name=single")
