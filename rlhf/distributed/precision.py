"""Whether `strategy.mixed_precision=auto` computes in bf16 on this CPU: only where the cores
have native bf16 products (avx512_bf16 or amx_bf16) *and* a start-up probe times them faster
than the fp32 products training uses now. Without those instructions bf16 matmuls run at
~1 GFLOP/s (MACHINE-NOTES); with them they ran at 2x (Zen 5, avx512_bf16) to 7x (Xeon, AMX)
the fp32 peak, but a small model's casts can eat that, hence the timing.

The probe times one linear layer as training runs it, (PROBE_ROWS, width) x (width, 4·width)
as a SmolLM2 MLP projection, with an fp32 weight: in fp32 through the kernel CPU linear layers
use (rlhf/kernels/cpu_linear.py), and under CPU autocast bf16 with the casts of input and
weight included (what the single strategy's autocast pays on each call). bf16 must win by
MARGIN, so that timing noise on a machine where the two are close does not flip the choice
from run to run. The result is cached per process; the workers of one run agree on it or stop
(`check_agreement`).

`RLHF_CPU_BF16` overrides the probe: `0` keeps fp32, `1` takes bf16 wherever the instructions
exist without timing anything (the test suite pins 0, so that its exact comparisons do not
depend on the machine).
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping

import torch

BF16_FLAGS = ("avx512_bf16", "amx_bf16")
PROBE_WIDTH = 576
"""SmolLM2-135M's hidden size: the model size this project benchmarks on the CPU."""
PROBE_ROWS = 512
MARGIN = 1.1
"""bf16 must take at most 1/MARGIN of fp32's time."""
ENV = "RLHF_CPU_BF16"


@dataclass(frozen=True)
class CpuBf16Probe:
    """What decided `auto` on this CPU; recorded with every run."""

    bf16: bool
    """auto computes in bf16 here."""
    reason: str
    flags: tuple[str, ...] = ()
    """The CPU's bf16 instructions (of BF16_FLAGS)."""
    fp32_gflops: float | None = None
    bf16_gflops: float | None = None
    """The timed layer's rate, casts included (None: not timed)."""
    width: int = PROBE_WIDTH

    def as_dict(self) -> dict:
        return asdict(self)


def cpu_bf16_flags(cpuinfo: str | None = None) -> tuple[str, ...]:
    """The BF16_FLAGS of this CPU (from /proc/cpuinfo, or `cpuinfo`)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace")
        except OSError:
            return ()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            present = set(value.split())
            return tuple(flag for flag in BF16_FLAGS if flag in present)
    return ()


def decide(flags: tuple[str, ...], fp32_seconds: float | None, bf16_seconds: float | None,
           override: str = "", width: int = PROBE_WIDTH) -> CpuBf16Probe:
    """The rule, from what was read and timed (`override`: RLHF_CPU_BF16)."""
    flops = 2 * PROBE_ROWS * width * 4 * width
    rate = lambda seconds: round(flops / seconds / 1e9, 1) if seconds else None  # noqa: E731
    timed = {"fp32_gflops": rate(fp32_seconds), "bf16_gflops": rate(bf16_seconds), "width": width}
    if override == "0":
        return CpuBf16Probe(False, f"{ENV}=0", flags, **timed)
    if not flags:
        return CpuBf16Probe(False, "no avx512_bf16/amx_bf16: bf16 products are emulated, far slower than fp32",
                            flags, **timed)
    if override == "1":
        return CpuBf16Probe(True, f"{ENV}=1 and {'+'.join(flags)}", flags, **timed)
    if fp32_seconds is None or bf16_seconds is None:
        return CpuBf16Probe(False, "not timed", flags, **timed)
    faster = fp32_seconds / bf16_seconds
    if faster >= MARGIN:
        return CpuBf16Probe(True, f"{'+'.join(flags)}; bf16 {faster:.2f}x as fast as fp32", flags, **timed)
    return CpuBf16Probe(False, f"{'+'.join(flags)}, but bf16 only {faster:.2f}x as fast as fp32 "
                               f"(needs {MARGIN}x)", flags, **timed)


def time_layer(width: int = PROBE_WIDTH, rounds: int = 7) -> tuple[float, float]:
    """(fp32 seconds, autocast-bf16 seconds) of one linear layer's forward (see the module doc):
    the best of `rounds`, the two taken in turn so that a busy spell weighs on both, on one
    thread (the ratio is per core; two threads on a core another process is using time
    nothing but the contention)."""
    from rlhf.kernels.cpu_linear import cpu_linear

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(PROBE_ROWS, width, generator=generator)
    weight = torch.randn(4 * width, width, generator=generator, requires_grad=True)

    def fp32() -> None:
        cpu_linear(x, weight)

    def bf16() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):  # a fresh region: the weight's cast counts
            cpu_linear(x, weight)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    best = [float("inf"), float("inf")]
    try:
        with torch.no_grad():
            fp32(), bf16()  # warm-up: first-call costs (kernel choice, allocations)
            for _ in range(rounds):
                for index, step in enumerate((fp32, bf16)):
                    started = time.perf_counter()
                    step()
                    best[index] = min(best[index], time.perf_counter() - started)
    finally:
        torch.set_num_threads(threads)
    return best[0], best[1]


@functools.cache
def _probe(override: str) -> CpuBf16Probe:
    flags = cpu_bf16_flags()
    if override in ("0", "1") or not flags:
        return decide(flags, None, None, override)
    return decide(flags, *time_layer(), override)


def cpu_bf16_probe(environ: Mapping[str, str] | None = None) -> CpuBf16Probe:
    """This process's decision for `auto` on the CPU (timed once per process)."""
    environ = os.environ if environ is None else environ
    return _probe(environ.get(ENV, "").strip())


def resolve_precision(name: str, device: torch.device) -> str:
    """`strategy.mixed_precision` -> no / bf16 / fp16. auto: bf16 on GPUs that have it and on
    CPUs where `cpu_bf16_probe` says so; no (fp32) elsewhere."""
    if name != "auto":
        return "no" if name == "False" else name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    return "bf16" if cpu_bf16_probe().bf16 else "no"


LOW_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16}


def describe(name: str, resolved: str, device: torch.device) -> str:
    """One line for the run's log: what the forwards compute in, and why when `name` is auto
    (on the CPU with the probe's numbers)."""
    what = "fp32" if resolved == "no" else f"{resolved} compute, fp32 master weights and AdamW states"
    if name != "auto":
        return f"{what} (strategy.mixed_precision={name})"
    if device.type == "cuda":
        return f"{what} (strategy.mixed_precision=auto on a GPU)"
    probe = cpu_bf16_probe()
    timed = (f"; {probe.bf16_gflops} against {probe.fp32_gflops} GFLOP/s, a {PROBE_ROWS}x{probe.width} by "
             f"{probe.width}x{4 * probe.width} product on one core" if probe.fp32_gflops else "")
    return f"{what} (strategy.mixed_precision=auto: {probe.reason}{timed})"
