"""Optimizer and learning-rate schedule built from the train config."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import (
    get_constant_schedule_with_warmup,
    get_cosine_with_min_lr_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

from rlhf.config_sections import TrainConfig


@dataclass
class OptimizerSpec:
    """Everything an engine needs to build the optimizer and schedule for one model."""

    lr: float
    weight_decay: float
    betas: tuple[float, float]
    eps: float
    max_grad_norm: float
    scheduler: str
    warmup_steps: int
    total_steps: int
    min_lr_ratio: float

    @classmethod
    def from_train(cls, train: TrainConfig, total_steps: int, lr: float | None = None) -> "OptimizerSpec":
        return cls(
            lr=lr if lr is not None else train.lr,
            weight_decay=train.weight_decay,
            betas=(train.adam_betas[0], train.adam_betas[1]),
            eps=train.adam_eps,
            max_grad_norm=train.max_grad_norm,
            scheduler=train.lr_scheduler,
            warmup_steps=int(round(train.warmup_ratio * total_steps)),
            total_steps=total_steps,
            min_lr_ratio=train.min_lr_ratio,
        )


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: decaying norms and biases hurts and is not standard."""
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # A ZeRO-3 partition (built under zero.Init) is a flat piece; its shape is ds_shape.
        ndim = len(getattr(param, "ds_shape", param.shape))
        (decay if ndim >= 2 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: torch.nn.Module, spec: OptimizerSpec) -> torch.optim.Optimizer:
    groups = param_groups(model, spec.weight_decay)
    params = [p for group in groups for p in group["params"]]
    # The fused kernel makes one pass over each parameter: on the CPU a step is several times
    # faster than with foreach (BENCHMARKS.md, 'Measurements behind the code'); on GPU it is
    # one launch per group.
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, lr=spec.lr, betas=spec.betas, eps=spec.eps, fused=fused or None)


def build_scheduler(optimizer: torch.optim.Optimizer, spec: OptimizerSpec) -> torch.optim.lr_scheduler.LambdaLR:
    if spec.scheduler == "cosine":
        return get_cosine_with_min_lr_schedule_with_warmup(
            optimizer, spec.warmup_steps, max(spec.total_steps, 1), min_lr_rate=spec.min_lr_ratio
        )
    if spec.scheduler == "linear":
        return get_linear_schedule_with_warmup(optimizer, spec.warmup_steps, max(spec.total_steps, 1))
    return get_constant_schedule_with_warmup(optimizer, spec.warmup_steps)
