"""Building the configured strategy: the one place that knows every implementation."""

from __future__ import annotations

import os

from rlhf.config_sections import StrategyConfig
from rlhf.distributed.precision import ProbeShape
from rlhf.distributed.strategy import Strategy
from rlhf.errors import UserError


def build_strategy(cfg: StrategyConfig, probe_shape: ProbeShape | None = None) -> Strategy:
    """`probe_shape`: the model `auto` times bf16 at on a CPU (precision.probe_shape)."""
    if cfg.name == "single":
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if world > 1:
            raise UserError(
                f"strategy.name=single runs one process, but this launch has WORLD_SIZE={world}; "
                "use strategy.name=deepspeed or strategy.name=fsdp"
            )
        from rlhf.distributed.single import SingleStrategy

        return SingleStrategy(cfg, probe_shape)
    if cfg.name == "deepspeed":
        from rlhf.distributed.deepspeed import DeepSpeedStrategy

        return DeepSpeedStrategy(cfg, probe_shape)
    if cfg.name == "fsdp":
        from rlhf.distributed.fsdp import FSDPStrategy

        return FSDPStrategy(cfg, probe_shape)
    raise UserError(f"strategy.name={cfg.name!r} is not one of: single, deepspeed, fsdp")
