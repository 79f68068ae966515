"""Whether `strategy.mixed_precision=auto` computes in bf16 on this CPU: only where the cores
have native bf16 products (avx512_bf16 or amx_bf16) *and* a start-up probe times them faster
than the fp32 products training uses now. Without those instructions bf16 matmuls run at
~1 GFLOP/s (MACHINE-NOTES); with them they ran at 2x (Zen 5, avx512_bf16) to 7x (Xeon, AMX)
the fp32 peak, but a small model's casts can eat that, hence the timing.

The probe times the MLP of the model the run trains as training runs it (`ProbeShape`: its
hidden and intermediate widths, a micro-batch's tokens as rows): the up projection (tokens,
hidden) x (hidden, intermediate) and the down projection back, with fp32 weights: in fp32
through the kernel CPU linear layers use (rlhf/kernels/cpu_linear.py), and under CPU autocast
bf16 with the casts of inputs and weights included (what the single strategy's autocast pays
on each call). The width decides: a SmolLM2-wide layer runs ~2x faster in bf16 on Zen 5, but
the quickstart's hidden-64 model trained slower in bf16 (74 against 58 ms a step), its casts
costing more than its products gain. bf16 must win by MARGIN, so that timing noise on a
machine where the two are close does not flip the choice from run to run. The result is
cached per process and shape; the workers of one run agree on it or stop
(DistributedStrategy._agreed_precision).

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
from typing import Any, Mapping

import torch

from rlhf.errors import UserError

BF16_FLAGS = ("avx512_bf16", "amx_bf16")
MARGIN = 1.1
"""bf16 must take at most 1/MARGIN of fp32's time."""
ENV = "RLHF_CPU_BF16"
TOKENS = (64, 1024)
"""The probe's rows are a micro-batch's tokens, clamped: enough rows for the kernels' blocking,
few enough that the probe stays well under a second on one core."""


@dataclass(frozen=True)
class ProbeShape:
    """The products the probe times: a model's MLP at a micro-batch's token count."""

    hidden: int
    intermediate: int
    tokens: int

    @property
    def flops(self) -> int:
        return 2 * 2 * self.tokens * self.hidden * self.intermediate  # up and down projection


SMOLLM2 = ProbeShape(576, 1536, 512)
"""Where the run's model is not known (plan estimates, a config without a model): SmolLM2-135M,
the model this project benchmarks on the CPU."""


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
    shape: ProbeShape = SMOLLM2

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
           override: str = "", shape: ProbeShape = SMOLLM2) -> CpuBf16Probe:
    """The rule, from what was read and timed (`override`: RLHF_CPU_BF16)."""
    rate = lambda seconds: round(shape.flops / seconds / 1e9, 1) if seconds else None  # noqa: E731
    timed = {"fp32_gflops": rate(fp32_seconds), "bf16_gflops": rate(bf16_seconds), "shape": shape}
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


def time_layer(shape: ProbeShape = SMOLLM2, rounds: int = 7) -> tuple[float, float]:
    """(fp32 seconds, autocast-bf16 seconds) of an MLP's two projections (see the module doc):
    the best of `rounds`, the two taken in turn so that a busy spell weighs on both, on one
    thread (the ratio is per core; two threads on a core another process is using time
    nothing but the contention)."""
    from rlhf.kernels.cpu_linear import cpu_linear

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape.tokens, shape.hidden, generator=generator)
    up = torch.randn(shape.intermediate, shape.hidden, generator=generator, requires_grad=True)
    down = torch.randn(shape.hidden, shape.intermediate, generator=generator, requires_grad=True)

    def fp32() -> None:
        cpu_linear(cpu_linear(x, up), down)

    def bf16() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):  # a fresh region: the weights' casts count
            cpu_linear(cpu_linear(x, up), down)

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
def _probe(override: str, shape: ProbeShape) -> CpuBf16Probe:
    flags = cpu_bf16_flags()
    if override in ("0", "1") or not flags:
        return decide(flags, None, None, override, shape)
    return decide(flags, *time_layer(shape), override, shape)


def cpu_bf16_probe(environ: Mapping[str, str] | None = None, shape: ProbeShape | None = None) -> CpuBf16Probe:
    """This process's decision for `auto` on the CPU for a model of `shape` (None: SMOLLM2),
    timed once per process and shape."""
    environ = os.environ if environ is None else environ
    return _probe(environ.get(ENV, "").strip(), shape or SMOLLM2)


def probe_shape(cfg: Any, environ: Mapping[str, str] | None = None) -> ProbeShape | None:
    """The shape `auto` probes at for a stage config (its `model`, a micro-batch's tokens), read
    only where a probe will time something (None elsewhere, and for a config without a model):
    auto on a machine without CUDA, no RLHF_CPU_BF16 pin, bf16 instructions present. A model
    config that cannot be read gives SMOLLM2 (loading the model reports the problem)."""
    environ = os.environ if environ is None else environ
    model = getattr(cfg, "model", None)
    if (model is None or getattr(getattr(cfg, "strategy", None), "mixed_precision", "auto") != "auto"
            or environ.get(ENV, "").strip() in ("0", "1") or not cpu_bf16_flags() or torch.cuda.is_available()):
        return None
    widths = _model_widths(model)
    if widths is None:
        return SMOLLM2
    return ProbeShape(*widths, tokens=min(max(micro_batch_tokens(cfg), TOKENS[0]), TOKENS[1]))


def micro_batch_tokens(cfg: Any) -> int:
    """Tokens in one training micro-batch at most: PPO's micro-batch of prompt + answer, the
    other stages' train micro-batch at data.max_length."""
    if hasattr(cfg, "ppo"):
        return cfg.ppo.micro_batch_size * (cfg.data.max_prompt_length + cfg.rollout.max_new_tokens)
    return cfg.train.micro_batch_size * cfg.data.max_length


def _model_widths(model: Any) -> tuple[int, int] | None:
    if model.tiny is not None:
        return model.tiny.hidden_size, model.tiny.intermediate_size
    try:
        from rlhf.plan.shapes import read_model_config

        config = read_model_config(model, "model")
    except UserError:  # loading the model reports it; the probe falls back
        return None
    config = getattr(config, "text_config", None) or config
    hidden = getattr(config, "hidden_size", None)
    return (hidden, getattr(config, "intermediate_size", None) or 4 * hidden) if hidden else None


def resolve_precision(name: str, device: torch.device, shape: ProbeShape | None = None) -> str:
    """`strategy.mixed_precision` -> no / bf16 / fp16. auto: bf16 on GPUs that have it and on
    CPUs where `cpu_bf16_probe` says so for a model of `shape`; no (fp32) elsewhere."""
    if name != "auto":
        return "no" if name == "False" else name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    return "bf16" if cpu_bf16_probe(shape=shape).bf16 else "no"


LOW_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16}


def describe(name: str, resolved: str, device: torch.device, shape: ProbeShape | None = None) -> str:
    """One line for the run's log: what the forwards compute in, and why when `name` is auto
    (on the CPU with the probe's numbers)."""
    what = "fp32" if resolved == "no" else f"{resolved} compute, fp32 master weights and AdamW states"
    if name != "auto":
        return f"{what} (strategy.mixed_precision={name})"
    if device.type == "cuda":
        return f"{what} (strategy.mixed_precision=auto on a GPU)"
    probe = cpu_bf16_probe(shape=shape)
    size = probe.shape
    timed = (f"; {probe.bf16_gflops} against {probe.fp32_gflops} GFLOP/s, an MLP of {size.hidden}x{size.intermediate} "
             f"over {size.tokens} tokens on one core" if probe.fp32_gflops is not None else "")
    return f"{what} (strategy.mixed_precision=auto: {probe.reason}{timed})"
