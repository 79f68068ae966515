"""The linear layer class `rlhf.kernels.accelerate` gives a CPU model's plain linear layers.

`CPULinear` keeps `nn.Linear`'s parameters, state dict and results (to float rounding); its
forward picks the kernel: oneDNN where `kernels.cpu_matmul` routes products there
(rlhf/kernels/onednn.py), else the transposed product for a few rows against a large weight
(rlhf/kernels/skinny.py), else `F.linear`, which is also what runs under CPU autocast. Weights an engine partitions or shards (ZeRO-3,
FSDP2) always take `F.linear`, which the engine may have wrapped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlhf.kernels import onednn
from rlhf.kernels.skinny import linear_for_few_rows
from rlhf.models.engines import is_whole


def cpu_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` through the fastest kernel that applies (see the module doc).
    Under CPU autocast (bf16 mixed precision) `F.linear` itself: autocast casts its operands,
    and the bf16 product is oneDNN's already; the fp32 kernels here would bypass the cast."""
    if torch.is_autocast_enabled("cpu") and x.device.type == "cpu":
        return F.linear(x, weight, bias)
    if onednn.onednn_enabled():
        return onednn.linear(x, weight, bias)
    if x.device.type == "cpu" and is_whole(weight):
        return linear_for_few_rows(x, weight, bias)
    return F.linear(x, weight, bias)


class CPULinear(torch.nn.Linear):
    """`nn.Linear` computed by `cpu_linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_linear(x, self.weight, self.bias)


def use_cpu_linears(model: torch.nn.Module) -> int:
    """Make every plain `nn.Linear` on the CPU a `CPULinear`; returns how many are. Subclasses
    (LoRA, quantised or sharded layers) keep their own forward."""
    swapped = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear and module.weight.device.type == "cpu":
            module.__class__ = CPULinear
            swapped += 1
    return swapped
