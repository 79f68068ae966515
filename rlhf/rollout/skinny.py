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


def _skinny_forward(module: torch.nn.Linear):
    def forward(x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows > SKINNY_ROWS or x.dtype != module.weight.dtype:
            return torch.nn.functional.linear(x, module.weight, module.bias)
        out = torch.mm(module.weight, x.reshape(rows, x.shape[-1]).t()).t()
        if module.bias is not None:
            out = out + module.bias
        return out.reshape(*x.shape[:-1], module.weight.shape[0])

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
