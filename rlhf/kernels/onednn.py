"""Linear layers on the CPU through oneDNN instead of the BLAS that `torch.mm` calls.

PyTorch's CPU build sends fp32 `F.linear` to MKL. On AMD processors MKL takes its AVX2 code
path even where the cores have AVX-512, so oneDNN, which PyTorch also ships and which uses
AVX-512 on any vendor, is roughly twice as fast there on the same products
(benchmarks/matmul_peak.py measures both; BENCHMARKS.md, 'Measurements behind the code'). This
module routes the three products of a linear layer (forward, input gradient, weight gradient)
through `torch.ops.mkldnn._linear_pointwise`, in plain fp32: the results equal `F.linear`'s to
float rounding (tests/models/test_onednn.py checks values and gradients).

`kernels.cpu_matmul` chooses (`RLHF_CPU_MATMUL` overrides it): `onednn`, `blas` (PyTorch's
default), or `auto` (the default): oneDNN on a non-Intel CPU with AVX-512, where MKL leaves
the wide units unused; elsewhere the BLAS, which is at least as fast there. The rule reads the
CPU, never a timing, so every process of a run (workers, restarts) computes with the same
kernels.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from rlhf.models.engines import is_whole

CHOICES = ("auto", "onednn", "blas")
_matmul = ["auto"]


def set_cpu_matmul(choice: str) -> None:
    """Choose the CPU matmul kernels for this process (see the module doc)."""
    if choice not in CHOICES:
        raise ValueError(f"kernels.cpu_matmul={choice!r}: expected one of {', '.join(CHOICES)}")
    _matmul[0] = choice


def _cpu_vendor() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            for line in info:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def onednn_enabled() -> bool:
    """Whether CPU linear layers compute through oneDNN in this process (see the module doc)."""
    return _onednn_for(_matmul[0])


@functools.cache
def _onednn_for(choice: str) -> bool:
    if choice == "blas" or not _has_onednn_linear():
        return False
    if choice == "onednn":
        return True
    avx512 = torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    return avx512 and torch.backends.mkl.is_available() and _cpu_vendor() not in ("", "GenuineIntel")


def decode_packing_enabled() -> bool:
    """Whether decode steps pack their large fp32 weights for oneDNN (see the module doc)."""
    return _packing_for(_matmul[0])


@functools.cache
def _packing_for(choice: str) -> bool:
    return choice != "blas" and _has_onednn_linear() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def _has_onednn_linear() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x · weightᵀ (+ bias) by oneDNN; `weight` (out, in) may be a strided view."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _product(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_2d = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = _product(grad_2d, weight.t(), None).reshape(x.shape)  # grad · W
        if ctx.needs_input_grad[1]:
            grad_weight = _product(grad_2d.t(), x.reshape(-1, x.shape[-1]).t(), None)  # gradᵀ · x
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_2d.sum(0)
        return grad_x, grad_weight, grad_bias


def _plain(tensor: torch.Tensor) -> bool:
    """A whole fp32 CPU tensor: not a ZeRO-3 partition (whose hooks expect F.linear) or a DTensor."""
    return tensor.device.type == "cpu" and tensor.dtype == torch.float32 and is_whole(tensor)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` computed by oneDNN when it applies, else by `F.linear`
    (looked up at call time, so a wrapper that DeepSpeed installs stays in charge)."""
    if (x.numel() == 0 or not _plain(x) or not _plain(weight) or (bias is not None and not _plain(bias))):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return _OneDNNLinear.apply(x, weight, bias)
    return _product(x, weight, bias)


def pack_weight(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """`weight` (out, in) reordered into oneDNN's blocked layout for products with about
    `rows` input rows: a decode step multiplies the same weights by a few rows many times,
    and the packed layout runs those products faster than the plain one."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, rows)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x · weightᵀ (+ bias) with a weight from `pack_weight` (no autograd)."""
    return _product(x, packed, bias)
