"""Whether `strategy.mixed_precision=auto` computes in bf16 on this CPU: only where the cores
have native bf16 products (avx512_bf16 or amx_bf16) *and* a start-up probe times them faster
than the fp32 products training uses now. Without those instructions bf16 matmuls run at
~1 GFLOP/s (MACHINE-NOTES); with them they ran at 2x (Zen 5, avx512_bf16) to 7x (Xeon, AMX)
the fp32 peak, but a small model's casts can eat that, hence the timing.

The probe times a training step of a one-layer model of the run's shape (`ProbeShape`: its
widths, heads and vocabulary, a micro-batch's tokens): forward, LM loss and backward of a Llama
layer and output layer with fp32 weights, in fp32 and under CPU autocast bf16 with every cast
included (what the single strategy's autocast pays). A whole layer, not its products alone:
at the quickstart's hidden 64 the MLP's products alone still ran 1.2-1.7x faster in bf16 on
Zen 5, yet the model trained slower in bf16 (74 against 58 ms a step): the casts and small
operations around the products eat the gain, and a one-layer step shows it (1.02-1.05x),
while a SmolLM2-wide one runs ~2x faster. The vocabulary is capped at VOCAB_CAP so that the
probe stays short on a large-vocabulary model (the cap leaves bf16 less of the head's large
product to win on, so it errs towards fp32). bf16 must win by MARGIN, so that timing noise on a
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


VOCAB_CAP = 8192
SEQUENCE = 128
"""The probe's rows are sequences of this length (fewer where the micro-batch has fewer tokens)."""


@dataclass(frozen=True)
class ProbeShape:
    """What the probe times: one layer of a model of these sizes over a micro-batch's tokens."""

    hidden: int
    intermediate: int
    tokens: int
    heads: int
    kv_heads: int
    vocab: int

    @property
    def flops(self) -> int:
        """Of a training step (6 per parameter and token) of the layer and the capped head."""
        kv_width = self.hidden // self.heads * self.kv_heads
        params = (2 * self.hidden * self.hidden + 2 * self.hidden * kv_width + 3 * self.hidden * self.intermediate
                  + self.hidden * min(self.vocab, VOCAB_CAP))
        return 6 * self.tokens * params


SMOLLM2 = ProbeShape(576, 1536, 512, heads=9, kv_heads=3, vocab=49152)
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


def time_layer(shape: ProbeShape = SMOLLM2, rounds: int = 3) -> tuple[float, float]:
    """(fp32 seconds, autocast-bf16 seconds) of a one-layer model's training step (see the module doc):
    the best of `rounds`, the two taken in turn so that a busy spell weighs on both, on one
    thread (the ratio is per core; two threads on a core another process is using time
    nothing but the contention)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = min(shape.vocab, VOCAB_CAP)
    sequence = min(shape.tokens, SEQUENCE)
    config = LlamaConfig(vocab_size=vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                         num_hidden_layers=1, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                         max_position_embeddings=sequence)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        ids = torch.randint(0, vocab, (max(1, shape.tokens // sequence), sequence))

    def fp32() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)

    def bf16() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):  # a fresh region: the weights' casts count
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    best = [float("inf"), float("inf")]
    try:
        with torch.enable_grad():  # a caller under no_grad (a frozen model's setup) still gets a backward
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
    sizes = _model_sizes(model)
    if sizes is None:
        return SMOLLM2
    return ProbeShape(tokens=min(max(micro_batch_tokens(cfg), TOKENS[0]), TOKENS[1]), **sizes)


def micro_batch_tokens(cfg: Any) -> int:
    """Tokens in one training micro-batch at most: PPO's micro-batch of prompt + answer, the
    other stages' train micro-batch at data.max_length."""
    if hasattr(cfg, "ppo"):
        return cfg.ppo.micro_batch_size * (cfg.data.max_prompt_length + cfg.rollout.max_new_tokens)
    return cfg.train.micro_batch_size * cfg.data.max_length


def _model_sizes(model: Any) -> dict[str, int] | None:
    if model.tiny is not None:
        tiny = model.tiny
        return {"hidden": tiny.hidden_size, "intermediate": tiny.intermediate_size, "heads": tiny.num_heads,
                "kv_heads": tiny.num_heads, "vocab": tiny.vocab_size}
    from transformers import AutoConfig

    from rlhf.models.loading import resolve_location

    try:
        location, gguf_file = resolve_location(model, model.path, "model.path")
        # The config only, never code shipped with a checkpoint; and only from disk or the
        # hub's cache: validating a config must not wait on the network (offline, the hub
        # client retries for half a minute), and a pipeline's not-yet-trained parents are
        # placeholders that no hub knows.
        config = AutoConfig.from_pretrained(location, revision=model.revision, trust_remote_code=False,
                                            local_files_only=True, **({"gguf_file": gguf_file} if gguf_file else {}))
    except (UserError, OSError, ValueError):  # loading the model reports it; the probe falls back
        return None
    config = getattr(config, "text_config", None) or config
    hidden, heads = getattr(config, "hidden_size", None), getattr(config, "num_attention_heads", None)
    if not hidden or not heads:
        return None
    return {"hidden": hidden, "intermediate": getattr(config, "intermediate_size", None) or 4 * hidden,
            "heads": heads, "kv_heads": getattr(config, "num_key_value_heads", None) or heads,
            "vocab": getattr(config, "vocab_size", None) or VOCAB_CAP}


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
    timed = (f"; {probe.bf16_gflops} against {probe.fp32_gflops} GFLOP/s, a training step of one layer of "
             f"{size.hidden}x{size.intermediate} and the head over {size.tokens} tokens on one core"
             if probe.fp32_gflops is not None else "")
    return f"{what} (strategy.mixed_precision=auto: {probe.reason}{timed})"
