"""The vLLM side of the rollout and RL benchmarks: a `VLLMSampler` built in the benchmark's
process as the colocated engine is (rlhf/rollout/vllm_engine.py), from the model directory's
own weights, and its start-up cost taken apart: the engine's construction, and its first
`generate` call (the CPU backend builds and warms its kernels there)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import common

common.add_project_to_path()

from rlhf.rollout.engine import SamplingParams  # noqa: E402
from rlhf.rollout.vllm_engine import engine_in_this_process, sample_seed  # noqa: E402
from rlhf.rollout.vllm_sampler import SamplerSettings, VLLMSampler  # noqa: E402


def build(directory: Path, eos_token_id: int, max_model_len: int, kv_cache_gib: float,
          dtype: str = "float32") -> tuple[VLLMSampler, float]:
    """The engine over `directory` and the seconds its construction took."""
    settings = SamplerSettings(dtype=dtype, max_model_len=max_model_len, kv_cache_gib=kv_cache_gib)
    started = time.perf_counter()
    with engine_in_this_process():
        sampler = VLLMSampler(directory, settings, eos_token_id)
    return sampler, time.perf_counter() - started


def generate(sampler: VLLMSampler, prompts: Sequence[Sequence[int]], new_tokens: int, seed: int,
             batch_size: int | None = None) -> int:
    """One call at temperature 1, no top-k/top-p, answer i seeded by (seed, i) as the engine
    seeds a rollout's answers; returns the new tokens (EOS included where it came)."""
    params = SamplingParams(max_new_tokens=new_tokens, temperature=1.0)
    seeds = [sample_seed(seed, i) for i in range(len(prompts))]
    return sum(len(tokens) for tokens, _ in sampler.generate(prompts, params, seeds, batch_size))


def startup(directory: Path, eos_token_id: int, prompts: Sequence[Sequence[int]], new_tokens: int,
            kv_cache_gib: float, dtype: str = "float32", max_prompt_length: int | None = None
            ) -> tuple[VLLMSampler, dict]:
    """Build the engine (for prompts up to `max_prompt_length` tokens, default the longest of
    `prompts`) and make its first call (`prompts`); the engine and {construct_s,
    first_call_s, first_call_prompts, vllm, ...}."""
    import vllm

    max_model_len = (max_prompt_length or max(len(p) for p in prompts)) + new_tokens
    sampler, construct = build(directory, eos_token_id, max_model_len, kv_cache_gib, dtype)
    started = time.perf_counter()
    generate(sampler, prompts, new_tokens, seed=0)
    return sampler, {"construct_s": construct, "first_call_s": time.perf_counter() - started,
                     "first_call_prompts": len(prompts), "vllm": vllm.__version__, "dtype": dtype,
                     "kv_cache_gib": kv_cache_gib}
