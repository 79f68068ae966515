"""The device's measured matmul FLOP/s: the ceiling MFU is taken against.

    python benchmarks/matmul_peak.py [--sizes 1024,2048,4096] [--repeats 5]

Square fp32 matmuls (and bf16 on a GPU) of several sizes, each timed `repeats` times after a
warm-up; the peak is the best size's median. On the CPU it runs with the threads torch uses
by default (all cores), as training does.
"""

from __future__ import annotations

import argparse
import time

import common

import torch


def matmul_flops(size: int, dtype: torch.dtype, device: torch.device, repeats: int) -> float:
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    out = torch.empty(size, size, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    inner = max(1, int(2e11 // (2 * size**3))) if device.type == "cuda" else 1  # ~0.2 TFLOP per timing on GPU
    torch.mm(a, b, out=out)
    sync()
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(inner):
            torch.mm(a, b, out=out)
        sync()
        seconds.append((time.perf_counter() - started) / inner)
    return 2 * size**3 / common.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="512,1024,2048,4096")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtypes = [torch.float32] + ([torch.bfloat16] if device.type == "cuda" else [])
    rows = []
    for dtype in dtypes:
        for size in (int(s) for s in args.sizes.split(",")):
            rows.append({"dtype": str(dtype).removeprefix("torch."), "size": size,
                         "gflops": matmul_flops(size, dtype, device, args.repeats) / 1e9})
    peaks = {}
    for row in rows:
        peaks[row["dtype"]] = max(peaks.get(row["dtype"], 0.0), row["gflops"] * 1e9)
    common.emit("matmul_peak", rows, ["dtype", "size", "gflops"], {"peak_flops": peaks})


if __name__ == "__main__":
    main()
