"""Decode-time matmuls on the CPU: y = (W · xᵀ)ᵀ instead of y = x · Wᵀ for few rows.

A decode step multiplies a handful of rows (one per sequence) by every weight matrix. The
CPU BLAS picks a poor kernel for `x · Wᵀ` when x has few rows and W many (SmolLM2's
49152 x 576 head: 35 ms at 8 rows against 12 ms for `W · xᵀ`; over all its linears one
decode step drops from ~123 to ~70 ms, benchmarks/rollout.py). The product is the same up
to float rounding. GPUs are left alone: their GEMMs handle skinny shapes well.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

SKINNY_ROWS = 64
"""Inputs with at most this many rows take the transposed product (measured faster up to
64 rows on the development CPU, and never slower on the model's shapes)."""

SKINNY_MIN_WEIGHT = 1 << 18
"""Weights with fewer elements (under 1 MB in fp32) keep `x · Wᵀ`: they stay in the cores'
caches from step to step, and there the plain product was faster (a 128-wide tiny model's
1024 x 128 matrix at 8 rows: 55 µs against 92 µs), while SmolLM2's matrices, all above
this size and read from memory each step, gain 10-60% from the transposed one."""


def linear_for_few_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, as the transposed product when x is a few CPU rows."""
    rows = x.numel() // x.shape[-1]
    if rows > SKINNY_ROWS or weight.numel() < SKINNY_MIN_WEIGHT or x.dtype != weight.dtype or x.device.type != "cpu":
        return torch.nn.functional.linear(x, weight, bias)
    out = torch.mm(weight, x.reshape(rows, x.shape[-1]).t()).t()
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


def _skinny_forward(module: torch.nn.Linear):
    def forward(x: torch.Tensor) -> torch.Tensor:
        return linear_for_few_rows(x, module.weight, module.bias)

    return forward


@contextmanager
def skinny_matmuls(model: torch.nn.Module) -> Iterator[None]:
    """Within the block, plain `nn.Linear` layers of a CPU model use the transposed product for
    few rows. Subclasses (LoRA, quantised or sharded layers) keep their own forward."""
    patched = []
    if next(model.parameters()).device.type == "cpu":
        for module in model.modules():
            if type(module) is torch.nn.Linear and "forward" not in module.__dict__:
                module.forward = _skinny_forward(module)
                patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            del module.forward
