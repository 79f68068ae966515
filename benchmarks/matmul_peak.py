"""The device's measured matmul FLOP/s: the ceiling MFU is taken against.

    python benchmarks/matmul_peak.py [--sizes 1024,2048,4096] [--repeats 5]

Square fp32 and bf16 matmuls of several sizes, each timed `repeats` times after a warm-up (the
timing is `rlhf.doctor.throughput.matmul_flops`, which `rlhf doctor` also reports); the peak of
each dtype is the best median over sizes and kernels, and MFU is taken against the peak of the
dtype a run computes in (benchmarks/common.py `peak_flops`). bf16 is timed on GPUs and on CPUs
with avx512_bf16 or amx_bf16; elsewhere a CPU emulates it at ~1 GFLOP/s, which nothing trains
in (strategy.mixed_precision=auto stays fp32 there), so it is left out with the reason. On the
CPU two kernels are timed,
with the threads torch uses by default (all cores), as training does:
- `torch.mm`, PyTorch's default (MKL in the x86 wheels);
- `onednn`, the oneDNN product that rlhf/kernels/onednn.py routes linear layers through. MKL
  leaves AVX-512 unused on AMD processors, so there the two can differ by 2x: the ceiling is
  the faster one, whichever the code under test uses.
"""

from __future__ import annotations

import argparse

import common

common.add_project_to_path()

import torch  # noqa: E402

from rlhf.distributed.precision import cpu_bf16_flags  # noqa: E402
from rlhf.doctor.throughput import matmul_flops  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="512,1024,2048,4096")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    flags = cpu_bf16_flags()
    native_bf16 = device.type == "cuda" or bool(flags)
    dtypes = [torch.float32] + ([torch.bfloat16] if native_bf16 else [])
    kernels = ["torch.mm"] + (["onednn"] if device.type == "cpu" and torch.backends.mkldnn.is_available() else [])
    rows = []
    for dtype in dtypes:
        for kernel in kernels:
            for size in (int(s) for s in args.sizes.split(",")):
                rows.append({"dtype": str(dtype).removeprefix("torch."), "kernel": kernel, "size": size,
                             "gflops": matmul_flops(size, dtype, device, args.repeats, kernel) / 1e9})
    peaks, by_kernel = {}, {}
    for row in rows:
        peaks[row["dtype"]] = max(peaks.get(row["dtype"], 0.0), row["gflops"] * 1e9)
        key = f"{row['dtype']} {row['kernel']}"
        by_kernel[key] = max(by_kernel.get(key, 0.0), row["gflops"] * 1e9)
    bf16 = ("timed" if native_bf16 else
            "not timed: this CPU has no avx512_bf16/amx_bf16, its bf16 products run emulated (~1 GFLOP/s)")
    common.emit("matmul_peak", rows, ["dtype", "kernel", "size", "gflops"],
                {"peak_flops": peaks, "peak_flops_by_kernel": by_kernel, "bf16": bf16,
                 "cpu_bf16_flags": list(flags)})


if __name__ == "__main__":
    main()
