"""What a vLLM engine computes in when rollout.vllm.dtype=auto: one rule for the colocated
engine and the engine actors (where it is also the dtype the broadcast sends), so that both
placements sample in the precision the trainer's forwards compute in.

The rule: the strategy's resolved mixed precision where it is bf16 or fp16 (strategy.
mixed_precision=auto included, as rlhf/distributed/precision.py resolved it on this worker:
on a GPU with bf16, on a CPU by the start-up probe or RLHF_CPU_BF16); else the dtype of the
trainer's parameters (fp32 master weights compute in fp32; a model loaded in bf16 without
mixed precision computes in bf16). Under autocast the parameters stay fp32, so reading them
alone would build an fp32 engine beside a bf16 trainer.
"""

from __future__ import annotations

import torch

from rlhf.distributed.precision import LOW_PRECISION, resolve_precision

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""rollout.vllm.dtype's explicit values."""


def engine_dtype(requested: str, precision: str, param_dtype: torch.dtype) -> torch.dtype:
    """`requested`: rollout.vllm.dtype; `precision`: the strategy's resolved mixed precision
    (no / bf16 / fp16); `param_dtype`: the dtype of the trainer's parameters."""
    if requested != "auto":
        return DTYPES[requested]
    return LOW_PRECISION.get(precision, param_dtype)


def strategy_engine_dtype(requested: str, strategy, model: torch.nn.Module) -> torch.dtype:
    """`engine_dtype` for a set-up strategy (its `precision`, else resolved here from its
    config as setup would) and the trained `model`."""
    precision = getattr(strategy, "precision", None) or resolve_precision(
        strategy.cfg.mixed_precision, strategy.device, getattr(strategy, "probe_shape", None))
    return engine_dtype(requested, precision, next(model.parameters()).dtype)


def dtype_name(dtype: torch.dtype) -> str:
    """vLLM's name of a torch dtype (`torch.bfloat16` -> `bfloat16`)."""
    return str(dtype).removeprefix("torch.")
