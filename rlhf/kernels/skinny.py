"""Decode-time matmuls on the CPU, where a handful of rows (one per sequence) meets every
weight matrix.

- Wherever PyTorch has oneDNN (rlhf/kernels/onednn.py, `decode_packing_enabled`),
  `few_row_linear` packs each large weight once into oneDNN's blocked layout, where a few rows
  multiply clearly faster than through the transposed product below, also on CPUs whose
  training products stay with MKL.
- Otherwise (and in `CPULinear`, whose weights change between calls) the product is
  y = (W · xᵀ)ᵀ instead of y = x · Wᵀ: MKL picks a poor kernel for `x · Wᵀ` when x has few rows
  and W many, so `W · xᵀ` is several times faster on a vocabulary-sized head and takes a large
  share off a whole decode step.
Both are the same product up to float rounding. GPUs are left alone: their GEMMs handle
skinny shapes well. The timings behind both are in BENCHMARKS.md, 'Measurements behind the
code'.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

from rlhf.kernels import onednn

SKINNY_ROWS = 64
"""Inputs with at most this many rows take the transposed product: up to this many rows it
was the faster one, and never slower on the model's shapes."""

SKINNY_MIN_WEIGHT = 1 << 18
"""Weights with fewer elements (under 1 MB in fp32) keep `x · Wᵀ`: they stay in the cores'
caches from step to step, and there the plain product is faster (as for a 128-wide tiny
model's matrices), while SmolLM2's matrices, all above this size and read from memory each
step, gain from the transposed one."""

PACKED_MIN_WEIGHT = 1 << 17
"""Where decode steps pack for oneDNN, weights from this many elements (512 KB in fp32) are
packed: the packed product overtakes the plain one at about this size (a 1024 × 128 block at
8-16 rows), while smaller blocks lose to its fixed cost per call."""


def linear_for_few_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, as the transposed product when x is a few CPU rows."""
    rows = x.numel() // x.shape[-1]
    if rows > SKINNY_ROWS or weight.numel() < SKINNY_MIN_WEIGHT or x.dtype != weight.dtype or x.device.type != "cpu":
        return torch.nn.functional.linear(x, weight, bias)
    out = torch.mm(weight, x.reshape(rows, x.shape[-1]).t()).t()
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


def few_row_linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """`F.linear` with one weight over many calls of a few rows each (the decode step's
    weights, fixed for a whole `generate` call), prepared once for that: packed for oneDNN,
    the transposed product, or plain `F.linear` for small or GPU weights. A partial, since a
    decode step of a small model is bound by per-call overhead."""
    cpu = weight.device.type == "cpu"
    if cpu and weight.numel() >= PACKED_MIN_WEIGHT and weight.dtype == torch.float32 and onednn.decode_packing_enabled():
        return functools.partial(onednn.packed_linear, packed=onednn.pack_weight(weight, rows=8), bias=bias)
    if cpu and weight.numel() >= SKINNY_MIN_WEIGHT:
        return functools.partial(linear_for_few_rows, weight=weight, bias=bias)
    return functools.partial(torch.nn.functional.linear, weight=weight, bias=bias)


def _add_product(residual: torch.Tensor, x: torch.Tensor, product: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    return residual + product(x)


def few_row_linear_add(weight: torch.Tensor, bias: torch.Tensor | None = None
                       ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """`(residual, x) -> residual + F.linear(x, weight, bias)` for a residual stream, prepared
    like `few_row_linear`. Where that keeps the plain product (small or GPU weights, no bias)
    the addition is `addmm`'s own: one call instead of two."""
    product = few_row_linear(weight, bias)
    if bias is None and product.func is torch.nn.functional.linear:
        return functools.partial(torch.addmm, mat2=weight.t())
    return functools.partial(_add_product, product=product)
