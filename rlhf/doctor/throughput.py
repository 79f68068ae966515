"""Throughput figures: square-matmul FLOP/s in a dtype on a device (also the core of
benchmarks/matmul_peak.py), and the tokens per second of a tiny model's training step.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch


def matmul_flops(size: int, dtype: torch.dtype, device: torch.device, repeats: int, kernel: str = "torch.mm") -> float:
    """FLOP/s of a `size`² product (2·size³ FLOPs): the median of `repeats` timings after a
    warm-up. `kernel` "onednn" times the oneDNN product rlhf/kernels/onednn.py routes CPU linear
    layers through; "torch.mm" PyTorch's default (MKL on x86 CPUs, cuBLAS on GPUs). On a GPU
    each timing repeats the product to ~0.2 TFLOP, so that launch latency does not count."""
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    out = torch.empty(size, size, dtype=dtype, device=device)
    if kernel == "onednn":
        product = lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")  # noqa: E731
    else:
        product = lambda: torch.mm(a, b, out=out)  # noqa: E731
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    inner = max(1, int(2e11 // (2 * size**3))) if device.type == "cuda" else 1
    product()
    sync()
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(inner):
            product()
        sync()
        seconds.append((time.perf_counter() - started) / inner)
    return 2 * size**3 / statistics.median(seconds)


def training_tokens_per_s(device: torch.device, bf16: bool, batch: int, length: int, steps: int,
                          hidden: int = 64) -> dict[str, Any]:
    """Tokens per second of full training steps (forward, backward, AdamW) of the tiny model,
    after one untimed step, fp32 or under bf16 autocast (fp32 weights, as the single strategy
    trains in bf16); `matmul_params` is N of MFU's 6·N·tokens/s."""
    from rlhf.doctor.parity import tiny_model
    from rlhf.logging.perf import matmul_parameters

    model = tiny_model(device, hidden=hidden)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(2, 384, (batch, length), generator=torch.Generator().manual_seed(0)).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step() -> None:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    sync()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    seconds = (time.perf_counter() - started) / steps
    return {"tokens_per_s": batch * length / seconds, "step_seconds": seconds, "batch": batch, "length": length,
            "hidden": hidden, "dtype": "bf16 autocast" if bf16 else "fp32", "matmul_params": matmul_parameters(model)}
