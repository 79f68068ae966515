"""Precision and sharding: the bytes per element of a trained model, and which parts the
strategy shards over the workers or offloads to CPU memory.

Weights, gradients and AdamW states follow the ZeRO paper's accounting (Rajbhandari et al.
2020, sec. 3.1): mixed-precision Adam holds 2 + 2 + 12 bytes per parameter (16-bit weights and
gradients; fp32 master weights, momentum and variance). ZeRO stage 1 shards the optimizer
states over the workers, 2 also the gradients, 3 also the weights; FSDP2 shards all three.
Offload moves the optimizer (and, for parameters, the weights) to CPU memory.

What this project's code does decides the details: without mixed precision every strategy
trains in model.dtype; with it (strategy.mixed_precision bf16/fp16, or auto where it resolves
to one: on CUDA, and on a CPU whose bf16 probe says so, rlhf/distributed/precision.py) the
single strategy keeps fp32 weights and AdamW states and computes under autocast, whose casts of
the weights (2 bytes per parameter) live through a forward and its backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from rlhf.config_sections import ModelConfig, StrategyConfig

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Precision:
    """Bytes per element of a trained model under the strategy."""

    name: str
    param_bytes: int
    """Stored weights."""
    grad_bytes: int
    optim_bytes: int
    """Optimizer state per trainable parameter: AdamW's two moments, plus any master copy."""
    compute_bytes: int
    """Activations, gathered weights and the KV cache."""
    compute_copies: bool = False
    """The weights are also held cast to the compute dtype (autocast's casts)."""


def model_bytes(dtype: str, device_type: str) -> int:
    """Bytes per weight for model.dtype; auto is bf16 on CUDA and fp32 on CPU (as loading does)."""
    if dtype == "auto":
        return 2 if device_type == "cuda" else 4
    return _DTYPE_BYTES[dtype]


def resolve_mixed_precision(name: str, device_type: str, stage_cfg: Any = None) -> str:
    """strategy.mixed_precision -> no / bf16 / fp16 (auto: bf16 on CUDA; on the CPU as this
    machine's bf16 probe decides for `stage_cfg`'s model, as the run's own probe does)."""
    if name != "auto":
        return "no" if name == "False" else name
    if device_type == "cuda":
        return "bf16"
    from rlhf.distributed.precision import cpu_bf16_probe, probe_shape  # here only: the plan needs no torch otherwise

    return "bf16" if cpu_bf16_probe(shape=probe_shape(stage_cfg)).bf16 else "no"


def precision(strategy: StrategyConfig, model_cfg: ModelConfig, device_type: str, stage_cfg: Any = None) -> Precision:
    """`stage_cfg`: the stage config, whose model `auto` probes bf16 at on a CPU."""
    mixed = resolve_mixed_precision(strategy.mixed_precision, device_type, stage_cfg)
    if strategy.name == "deepspeed" and mixed in ("bf16", "fp16"):
        # ZeRO paper: 16-bit weights and gradients, K = 12 bytes of fp32 master, m and v.
        return Precision(f"{mixed} mixed precision, fp32 master weights and AdamW states", 2, 2, 12, 2)
    if strategy.name == "fsdp" and mixed in ("bf16", "fp16"):
        # FSDP2 upcasts the model before sharding: the fp32 shards are the master weights.
        return Precision(f"{mixed} compute, fp32 sharded weights, gradients and AdamW states", 4, 4, 8, 2)
    if strategy.name == "single" and mixed in ("bf16", "fp16"):
        # Upcast to fp32 master weights; autocast holds a cast copy of each for compute.
        return Precision(f"{mixed} compute (autocast), fp32 weights, gradients and AdamW states", 4, 4, 8, 2,
                         compute_copies=True)
    width = model_bytes(model_cfg.dtype, device_type)
    name = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(model_cfg.dtype,
                                                                          "bf16" if width == 2 else "fp32")
    name += " (model.dtype, no mixed precision)"
    # Without mixed precision AdamW keeps its moments in the weights' dtype.
    return Precision(name, width, width, 2 * width, width)


class Sharding(NamedTuple):
    params: bool
    grads: bool
    optim: bool
    offload_params: bool
    offload_grads: bool
    offload_optim: bool


def sharding(strategy: StrategyConfig) -> Sharding:
    if strategy.name == "fsdp":
        offload = strategy.offload_params or strategy.offload_optimizer  # FSDP2 offloads all three together
        return Sharding(True, True, True, offload, offload, offload)
    if strategy.name == "deepspeed":
        stage = strategy.zero_stage
        return Sharding(strategy.shards_weights, stage >= 2, stage >= 1, strategy.offload_params, False,
                        strategy.offload_optimizer)
    return Sharding(False, False, False, False, False, False)


def describe_strategy(strategy: StrategyConfig) -> str:
    if strategy.name == "single":
        return "single process"
    text = "FSDP2" if strategy.name == "fsdp" else f"DeepSpeed ZeRO-{strategy.zero_stage}"
    flags = (("optimizer", strategy.offload_optimizer), ("params", strategy.offload_params))
    offloaded = [name for name, on in flags if on]
    return text + (f", offload {' + '.join(offloaded)}" if offloaded else "")
